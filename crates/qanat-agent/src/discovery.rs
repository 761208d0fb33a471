//! Finding the files to tail (B1): a walk of each pattern's literal base directory matched
//! against the globs, run periodically, plus an inotify watcher (through `notify`) that only
//! makes discovery sooner. Inotify misses files (watch limits, sub-directories created faster
//! than watches are added), so nothing depends on it alone.

use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("pattern {pattern:?}: {source}")]
    Glob {
        pattern: String,
        #[source]
        source: globset::Error,
    },
    #[error("pattern {0:?} must be an absolute path")]
    Relative(String),
}

/// The walk roots and matchers of all sources.
#[derive(Debug)]
pub struct Matcher {
    sources: Vec<SourceGlobs>,
    /// (base dir, max depth below it; `None` = unlimited because of `**`).
    roots: Vec<(PathBuf, Option<usize>)>,
}

#[derive(Debug)]
struct SourceGlobs {
    include: GlobSet,
    exclude: GlobSet,
}

fn glob(pattern: &str) -> Result<Glob, DiscoveryError> {
    // `*` stays within one path component; `**` crosses them.
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|source| DiscoveryError::Glob {
            pattern: pattern.to_string(),
            source,
        })
}

fn is_meta(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

/// The literal directory a pattern starts from, and how deep below it matches can lie.
fn root_of(pattern: &str) -> (PathBuf, Option<usize>) {
    let mut base = PathBuf::new();
    let mut depth = 0usize;
    let mut unlimited = false;
    let mut in_glob = false;
    for c in Path::new(pattern).components() {
        let s = c.as_os_str().to_string_lossy();
        if !in_glob && !is_meta(&s) {
            base.push(c);
            continue;
        }
        in_glob = true;
        if s.contains("**") {
            unlimited = true;
        }
        depth += 1;
    }
    if !in_glob {
        // A literal file path: its parent is the walk root.
        let parent = base.parent().map(Path::to_path_buf).unwrap_or_default();
        return (parent, Some(1));
    }
    (base, (!unlimited).then_some(depth))
}

impl Matcher {
    pub fn new(sources: &[(Vec<String>, Vec<String>)]) -> Result<Matcher, DiscoveryError> {
        let mut out = Vec::new();
        let mut roots: Vec<(PathBuf, Option<usize>)> = Vec::new();
        for (include, exclude) in sources {
            let mut inc = GlobSetBuilder::new();
            for p in include {
                if !Path::new(p).has_root() {
                    return Err(DiscoveryError::Relative(p.clone()));
                }
                inc.add(glob(p)?);
                let (base, depth) = root_of(p);
                match roots.iter_mut().find(|(b, _)| *b == base) {
                    Some((_, d)) => {
                        *d = match (*d, depth) {
                            (Some(a), Some(b)) => Some(a.max(b)),
                            _ => None,
                        }
                    }
                    None => roots.push((base, depth)),
                }
            }
            let mut exc = GlobSetBuilder::new();
            for p in exclude {
                exc.add(glob(p)?);
            }
            let build = |b: GlobSetBuilder, pattern: String| {
                b.build()
                    .map_err(|source| DiscoveryError::Glob { pattern, source })
            };
            out.push(SourceGlobs {
                include: build(inc, include.join(","))?,
                exclude: build(exc, exclude.join(","))?,
            });
        }
        // Drop roots nested in another unlimited root: one walk covers them.
        let all = roots.clone();
        roots.retain(|(b, _)| {
            !all.iter()
                .any(|(o, d)| d.is_none() && o != b && b.starts_with(o))
        });
        Ok(Matcher {
            sources: out,
            roots,
        })
    }

    /// The first source whose globs take `path`.
    pub fn source_of(&self, path: &Path) -> Option<usize> {
        self.sources
            .iter()
            .position(|s| s.include.is_match(path) && !s.exclude.is_match(path))
    }

    pub fn roots(&self) -> impl Iterator<Item = &Path> {
        self.roots.iter().map(|(b, _)| b.as_path())
    }

    /// Every regular file (symlinks followed for files, not for directories) under the roots
    /// that some source takes, with that source's index. Unreadable directories are skipped.
    pub fn scan(&self) -> Vec<(PathBuf, usize)> {
        let mut found = Vec::new();
        for (root, depth) in &self.roots {
            self.walk(root, *depth, &mut found);
        }
        found.sort();
        found.dedup();
        found
    }

    fn walk(&self, dir: &Path, depth: Option<usize>, found: &mut Vec<(PathBuf, usize)>) {
        if depth == Some(0) {
            return;
        }
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in rd.flatten() {
            let path = entry.path();
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                self.walk(&path, depth.map(|d| d - 1), found);
            } else if ft.is_file() || (ft.is_symlink() && path.is_file()) {
                if let Some(s) = self.source_of(&path) {
                    found.push((path, s));
                }
            }
        }
    }
}

/// What the watcher tells the agent loop.
#[derive(Debug)]
pub enum FsEvent {
    /// These paths' contents changed.
    Modified(Vec<PathBuf>),
    /// Something was created, removed or renamed: time for a rescan.
    Structure,
}

/// Watch the roots recursively; events go to `tx`. A root that does not exist yet is
/// picked up by [`Watcher::refresh`] after it appears.
pub struct Watcher {
    inner: notify::RecommendedWatcher,
    watched: Vec<PathBuf>,
}

impl Watcher {
    pub fn new(tx: Sender<FsEvent>) -> Result<Watcher, notify::Error> {
        use notify::EventKind;
        let inner = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let ev = match res {
                Ok(ev) => match ev.kind {
                    EventKind::Modify(notify::event::ModifyKind::Data(_)) => {
                        FsEvent::Modified(ev.paths)
                    }
                    EventKind::Access(_) => return,
                    _ => FsEvent::Structure,
                },
                // Overflowed queue and the like: rescan.
                Err(_) => FsEvent::Structure,
            };
            let _ = tx.send(ev);
        })?;
        Ok(Watcher {
            inner,
            watched: Vec::new(),
        })
    }

    /// Add watches for roots that exist and are not watched yet.
    pub fn refresh<'a>(&mut self, roots: impl Iterator<Item = &'a Path>) {
        use notify::{RecursiveMode, Watcher as _};
        for root in roots {
            if self.watched.iter().any(|w| w == root) || !root.is_dir() {
                continue;
            }
            match self.inner.watch(root, RecursiveMode::Recursive) {
                Ok(()) => self.watched.push(root.to_path_buf()),
                Err(e) => {
                    tracing::warn!(root = %root.display(), error = %e, "inotify watch failed; relying on the rescan")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn roots_and_depths() {
        assert_eq!(
            root_of("/var/log/*.log"),
            (PathBuf::from("/var/log"), Some(1))
        );
        assert_eq!(
            root_of("/var/log/**/*.log"),
            (PathBuf::from("/var/log"), None)
        );
        assert_eq!(root_of("/var/*/x/*.log"), (PathBuf::from("/var"), Some(3)));
        assert_eq!(
            root_of("/var/log/app.log"),
            (PathBuf::from("/var/log"), Some(1))
        );
    }

    #[test]
    fn recursive_globs_find_nested_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("a/b/c")).unwrap();
        for p in [
            "x.log",
            "a/y.log",
            "a/b/c/z.log",
            "a/b/skip.txt",
            "a/b/no.log",
        ] {
            std::fs::write(d.join(p), b"1\n").unwrap();
        }
        let inc = vec![format!("{}/**/*.log", d.display())];
        let exc = vec![format!("{}/**/no.log", d.display())];
        let m = Matcher::new(&[(inc, exc)]).unwrap();
        let found: Vec<_> = m
            .scan()
            .into_iter()
            .map(|(p, _)| p.strip_prefix(d).unwrap().to_path_buf())
            .collect();
        assert_eq!(
            found,
            vec![
                PathBuf::from("a/b/c/z.log"),
                PathBuf::from("a/y.log"),
                PathBuf::from("x.log")
            ]
        );
        // `*` does not cross directories.
        let m = Matcher::new(&[(vec![format!("{}/*.log", d.display())], vec![])]).unwrap();
        assert_eq!(m.scan().len(), 1);
    }
}
