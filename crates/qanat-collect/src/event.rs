//! Input validation and the record written to the bus, for beacons (D1, D2, D6) and app
//! batches (D3).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::Priority;
use crate::enrich::UaInfo;

/// App names, event types, visitor and user ids: short, printable, no separators that could
/// confuse topic routing or log processing.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// An SPM position code `a.b.c.d` (site.page.block.position); a page view may carry only
/// `a.b`, so 2 to 4 segments.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct Spm<'a> {
    pub code: &'a str,
    pub a: &'a str,
    pub b: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub c: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub d: Option<&'a str>,
}

pub fn parse_spm(code: &str) -> Result<Spm<'_>, String> {
    let bad = || {
        format!(
            "spm {:?} is not a.b[.c[.d]] of [A-Za-z0-9_-]",
            crate::enrich::truncate(code, 80)
        )
    };
    let parts: Vec<&str> = code.split('.').collect();
    if !(2..=4).contains(&parts.len())
        || parts.iter().any(|p| {
            p.is_empty()
                || p.len() > 64
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
    {
        return Err(bad());
    }
    Ok(Spm {
        code,
        a: parts[0],
        b: parts[1],
        c: parts.get(2).copied(),
        d: parts.get(3).copied(),
    })
}

/// Where and from what the request came, added to every record.
#[derive(Debug, Serialize)]
pub struct Client<'a> {
    pub ip: String,
    pub user_agent: &'a str,
    pub browser: &'a str,
    pub browser_version: &'a str,
    pub os: &'a str,
    pub os_version: &'a str,
    pub device: &'a str,
    pub crawler: bool,
}

impl<'a> Client<'a> {
    pub fn new(ip: String, user_agent: &'a str, ua: &'a UaInfo) -> Client<'a> {
        Client {
            ip,
            user_agent,
            browser: &ua.browser,
            browser_version: &ua.browser_version,
            os: &ua.os,
            os_version: &ua.os_version,
            device: &ua.device,
            crawler: ua.crawler,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Page<'a> {
    pub url: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub referrer: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub title: &'a str,
}

/// A beacon (`/t.gif`) as it goes to the bus.
#[derive(Debug, Serialize)]
pub struct BeaconRecord<'a> {
    pub app: &'a str,
    #[serde(rename = "type")]
    pub ty: &'a str,
    pub priority: Priority,
    pub source: &'static str,
    pub visitor_id: &'a str,
    pub user_id: Option<&'a str>,
    pub received_ms: i64,
    pub client_ts: Option<i64>,
    pub client: &'a Client<'a>,
    pub page: Page<'a>,
    pub spm: Option<Spm<'a>>,
    pub screen: Option<&'a str>,
    pub language: Option<&'a str>,
    /// Custom event name (`e=`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    /// `p_*` query parameters, prefix removed: business parameters of the page or click.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<&'a str, &'a str>,
}

/// `POST /v1/events` body.
#[derive(Debug, Deserialize)]
pub struct Envelope<'a> {
    pub app: String,
    /// Device info; `device.id` is the visitor id of app events (D1: device id in apps).
    #[serde(default)]
    pub device: Option<Map<String, Value>>,
    /// `user.id` when logged in.
    #[serde(default)]
    pub user: Option<Map<String, Value>>,
    #[serde(borrow)]
    pub events: Vec<&'a RawValue>,
}

/// One app event as it goes to the bus: the event object as sent, plus envelope and server
/// fields.
#[derive(Debug, Serialize)]
pub struct BatchRecord<'a> {
    pub app: &'a str,
    #[serde(rename = "type")]
    pub ty: &'a str,
    pub priority: Priority,
    pub source: &'static str,
    pub visitor_id: &'a str,
    pub user_id: Option<&'a str>,
    pub received_ms: i64,
    pub client_ts: Option<i64>,
    pub client: &'a Client<'a>,
    pub spm: Option<Spm<'a>>,
    pub device: Option<&'a Map<String, Value>>,
    /// The event exactly as the client sent it (validated, not re-encoded).
    pub event: &'a RawValue,
}

fn str_field<'m>(m: &'m Map<String, Value>, k: &str) -> Option<&'m str> {
    m.get(k).and_then(Value::as_str)
}

fn non_empty_str(m: &Map<String, Value>, k: &str) -> bool {
    str_field(m, k).is_some_and(|s| !s.trim().is_empty())
}

/// The checked parts of one batch event.
#[derive(Debug)]
pub struct Checked<'m> {
    pub ty: &'m str,
    pub visitor_id: &'m str,
    pub user_id: Option<&'m str>,
    pub client_ts: Option<i64>,
    pub spm: Option<Spm<'m>>,
}

/// Validate one event of a batch (D3). Required fields by type:
/// `page_view`: `page` object with `name` or `url`; `click`: `control` and `page`;
/// `custom`: `name` (and `duration_ms` ≥ 0, `properties` an object, when present);
/// `exposure`: non-empty `items` array. Other types need only `type`.
pub fn check_event<'m>(
    ev: &'m Map<String, Value>,
    env_visitor: Option<&'m str>,
    env_user: Option<&'m str>,
) -> Result<Checked<'m>, String> {
    let ty = match ev.get("type") {
        Some(Value::String(t)) if valid_id(t) => t.as_str(),
        Some(_) => return Err("type must be a short name of [A-Za-z0-9_.:-]".into()),
        None => return Err("missing field `type`".into()),
    };
    let page_ok = |required: bool| match ev.get("page") {
        Some(Value::Object(p)) => {
            if non_empty_str(p, "name") || non_empty_str(p, "url") {
                Ok(())
            } else {
                Err(format!("{ty}: page needs `name` or `url`"))
            }
        }
        Some(_) => Err(format!("{ty}: page must be an object")),
        None if required => Err(format!("{ty}: missing field `page`")),
        None => Ok(()),
    };
    match ty {
        "page_view" => page_ok(true)?,
        "click" => {
            if !non_empty_str(ev, "control") {
                return Err("click: missing field `control`".into());
            }
            page_ok(true)?;
        }
        "custom" => {
            if !non_empty_str(ev, "name") {
                return Err("custom: missing field `name`".into());
            }
            if let Some(d) = ev.get("duration_ms") {
                if !d.as_f64().is_some_and(|d| d >= 0.0) {
                    return Err("custom: duration_ms must be a number ≥ 0".into());
                }
            }
            if ev.get("properties").is_some_and(|p| !p.is_object()) {
                return Err("custom: properties must be an object".into());
            }
            page_ok(false)?;
        }
        "exposure" => {
            if ev
                .get("items")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty)
            {
                return Err("exposure: items must be a non-empty array".into());
            }
            page_ok(false)?;
        }
        _ => {}
    }
    let client_ts = match ev.get("ts") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or("ts must be an integer (ms since the epoch)")?,
        ),
    };
    let visitor_id = match str_field(ev, "visitor_id").or(env_visitor) {
        Some(v) if valid_id(v) => v,
        Some(_) => return Err("visitor id (device.id or visitor_id) is not a valid id".into()),
        None => return Err("missing visitor id: set device.id (or visitor_id)".into()),
    };
    let user_id = str_field(ev, "user_id")
        .or(env_user)
        .filter(|u| !u.is_empty());
    let spm = match str_field(ev, "spm") {
        Some(s) => Some(parse_spm(s)?),
        None => None,
    };
    Ok(Checked {
        ty,
        visitor_id,
        user_id,
        client_ts,
        spm,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn spm_codes() {
        let s = parse_spm("shop.home.banner.3").unwrap();
        assert_eq!(
            (s.a, s.b, s.c, s.d),
            ("shop", "home", Some("banner"), Some("3"))
        );
        assert!(parse_spm("shop.home").is_ok());
        for bad in ["", "a", "a..b", "a.b.c.d.e", "a.b c", "a.<b>"] {
            assert!(parse_spm(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn event_checks() {
        let ok = |v: Value| check_event(&obj(v), Some("dev-1"), None).map(|c| c.ty.to_string());
        assert_eq!(
            ok(serde_json::json!({"type":"page_view","page":{"name":"home"}})).unwrap(),
            "page_view"
        );
        assert!(ok(serde_json::json!({"type":"page_view"}))
            .unwrap_err()
            .contains("page"));
        assert!(
            ok(serde_json::json!({"type":"click","page":{"name":"home"}}))
                .unwrap_err()
                .contains("control")
        );
        assert!(ok(serde_json::json!({"type":"custom","name":"x","duration_ms":-1})).is_err());
        assert!(ok(serde_json::json!({"type":"exposure","items":[]})).is_err());
        assert!(ok(serde_json::json!({"type":"exposure","items":[{"id":"a","count":3}]})).is_ok());
        assert!(ok(serde_json::json!({"page":{"name":"home"}}))
            .unwrap_err()
            .contains("type"));
        assert!(ok(serde_json::json!({"type":"x y"})).is_err());
        assert!(ok(serde_json::json!({"type":"x","ts":"yesterday"})).is_err());
        assert!(
            check_event(&obj(serde_json::json!({"type":"x"})), None, None)
                .unwrap_err()
                .contains("visitor")
        );
    }
}
