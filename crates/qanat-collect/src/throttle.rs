//! The throttle table (D4): per app and event type, a priority and a sample rate. SDKs poll it
//! at `/v1/config`; the server applies it too, so an SDK that ignores it is shed all the same.
//! Operators replace it at run time (`PUT /admin/v1/config`, SIGHUP reload).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use serde::Serialize;

use crate::config::{AppSettings, EventSettings, Priority};

/// Why an event was not kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shed {
    /// Below the app's `min_priority`.
    Priority,
    /// Outside the sampled fraction of visitors.
    Sample,
}

impl Shed {
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::Priority => "priority",
            Shed::Sample => "sample",
        }
    }
}

#[derive(Debug, Default)]
struct Table {
    version: u64,
    apps: BTreeMap<String, AppSettings>,
}

/// Shared, swappable table. Readers take a short read lock and clone an `Arc`; a reader that
/// keeps a [`Snapshot`] checks `version` (written only on change, so reading it contends
/// with nothing) to know whether it is still current.
#[derive(Debug, Default)]
pub struct Throttle {
    table: RwLock<Arc<Table>>,
    /// The current table's version, stored after the table is swapped in.
    version: AtomicU64,
}

/// The settings one app's SDK polls.
#[derive(Debug, Serialize)]
pub struct AppView {
    pub app: String,
    pub version: u64,
    pub min_priority: Priority,
    pub upload_interval_ms: u64,
    /// Settings for event types not in `events`.
    pub default: EventSettings,
    pub events: BTreeMap<String, EventSettings>,
}

#[derive(Debug, Serialize)]
pub struct TableView {
    pub version: u64,
    pub apps: BTreeMap<String, AppSettings>,
}

impl Throttle {
    pub fn new(apps: BTreeMap<String, AppSettings>) -> Throttle {
        Throttle {
            table: RwLock::new(Arc::new(Table { version: 1, apps })),
            version: AtomicU64::new(1),
        }
    }

    fn current(&self) -> Arc<Table> {
        self.table.read().clone()
    }

    /// Replace the whole table (config reload).
    pub fn replace_all(&self, apps: BTreeMap<String, AppSettings>) -> u64 {
        let mut t = self.table.write();
        let version = t.version + 1;
        *t = Arc::new(Table { version, apps });
        self.version.store(version, Ordering::Release);
        version
    }

    /// Set (`Some`) or remove (`None`) one app's settings (admin endpoint).
    pub fn set_app(&self, app: &str, settings: Option<AppSettings>) -> u64 {
        let mut t = self.table.write();
        let mut apps = t.apps.clone();
        match settings {
            Some(s) => apps.insert(app.to_string(), s),
            None => apps.remove(app),
        };
        let version = t.version + 1;
        *t = Arc::new(Table { version, apps });
        self.version.store(version, Ordering::Release);
        version
    }

    pub fn table_view(&self) -> TableView {
        let t = self.current();
        TableView {
            version: t.version,
            apps: t.apps.clone(),
        }
    }

    pub fn app_view(&self, app: &str) -> AppView {
        let t = self.current();
        let s = settings_of(&t, app).cloned().unwrap_or_default();
        let default = s.events.get("*").copied().unwrap_or_default();
        AppView {
            app: app.to_string(),
            version: t.version,
            min_priority: s.min_priority,
            upload_interval_ms: s.upload_interval_ms,
            default,
            events: s.events.into_iter().filter(|(k, _)| k != "*").collect(),
        }
    }

    /// A snapshot to decide many events against one consistent table.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot(self.current())
    }

    /// A kept snapshot, replaced when the table has changed since it was taken.
    pub fn refresh<'s>(&self, kept: &'s mut Option<Snapshot>) -> &'s Snapshot {
        let version = self.version.load(Ordering::Acquire);
        if kept.as_ref().is_some_and(|s| s.0.version == version) {
            if let Some(s) = kept {
                return s;
            }
        }
        kept.insert(self.snapshot())
    }
}

fn settings_of<'t>(t: &'t Table, app: &str) -> Option<&'t AppSettings> {
    t.apps.get(app).or_else(|| t.apps.get("*"))
}

#[derive(Debug)]
pub struct Snapshot(Arc<Table>);

impl Snapshot {
    /// The event's priority, and whether it is shed. Sampling hashes the visitor id with the
    /// event type, so a sampled visitor keeps (or loses) all events of that type together.
    pub fn decide(&self, app: &str, ty: &str, visitor: &str) -> (Priority, Option<Shed>) {
        let Some(s) = settings_of(&self.0, app) else {
            return (Priority::Normal, None);
        };
        let ev = s
            .events
            .get(ty)
            .or_else(|| s.events.get("*"))
            .copied()
            .unwrap_or_default();
        if ev.priority < s.min_priority {
            return (ev.priority, Some(Shed::Priority));
        }
        if ev.sample < 1.0 && sample_point(visitor, ty) >= ev.sample {
            return (ev.priority, Some(Shed::Sample));
        }
        (ev.priority, None)
    }
}

/// A stable point in [0, 1) for (visitor, type): FNV-1a, so it does not change between
/// releases or restarts.
fn sample_point(visitor: &str, ty: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in visitor.bytes().chain([0]).chain(ty.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Finalise (murmur3 fmix64) so short ids spread over the whole range.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn app(min: Priority, events: &[(&str, Priority, f64)]) -> AppSettings {
        AppSettings {
            min_priority: min,
            events: events
                .iter()
                .map(|(t, p, s)| {
                    (
                        t.to_string(),
                        EventSettings {
                            priority: *p,
                            sample: *s,
                        },
                    )
                })
                .collect(),
            ..AppSettings::default()
        }
    }

    #[test]
    fn priority_and_sampling() {
        let t = Throttle::new(BTreeMap::from([(
            "web".to_string(),
            app(
                Priority::Normal,
                &[("click", Priority::Low, 1.0), ("pv", Priority::High, 0.5)],
            ),
        )]));
        let s = t.snapshot();
        assert_eq!(
            s.decide("web", "click", "v1"),
            (Priority::Low, Some(Shed::Priority))
        );
        assert_eq!(s.decide("web", "other", "v1"), (Priority::Normal, None));
        assert_eq!(s.decide("ios", "click", "v1"), (Priority::Normal, None));
        let kept = (0..10_000)
            .filter(|i| s.decide("web", "pv", &format!("visitor-{i}")).1.is_none())
            .count();
        assert!(
            (4_500..5_500).contains(&kept),
            "kept {kept} of 10000 at 0.5"
        );
        // Same visitor, same decision.
        assert_eq!(s.decide("web", "pv", "abc"), s.decide("web", "pv", "abc"));
    }

    #[test]
    fn runtime_changes_and_wildcard() {
        let t = Throttle::new(BTreeMap::new());
        let v = t.set_app("*", Some(app(Priority::Low, &[("*", Priority::Low, 0.0)])));
        assert_eq!(v, 2);
        assert_eq!(t.snapshot().decide("any", "x", "v").1, Some(Shed::Sample));
        let view = t.app_view("any");
        assert_eq!(view.default.sample, 0.0);
        assert_eq!(view.version, 2);
        t.set_app("*", None);
        assert_eq!(t.snapshot().decide("any", "x", "v").1, None);
    }

    #[test]
    fn a_kept_snapshot_follows_every_change() {
        let t = Throttle::new(BTreeMap::new());
        let mut kept = None;
        assert_eq!(t.refresh(&mut kept).decide("a", "x", "v").1, None);
        t.set_app("a", Some(app(Priority::High, &[])));
        assert_eq!(
            t.refresh(&mut kept).decide("a", "x", "v").1,
            Some(Shed::Priority)
        );
        t.replace_all(BTreeMap::new());
        assert_eq!(t.refresh(&mut kept).decide("a", "x", "v").1, None);
    }
}
