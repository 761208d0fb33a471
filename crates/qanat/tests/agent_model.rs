//! Model-based test of the log agent: random sequences of appends, rename rotations,
//! copytruncates, deletions, agent crashes (`kill -9`) and restarts, and broker crashes and
//! restarts, against the real binaries. The model remembers every byte written to every file
//! content; at the end the topic is read back and checked by `agent_support::check`, which
//! knows nothing of the agent's code or of `qanat audit`: zero bytes lost per content, values
//! equal to the file bytes they claim, and repeats only as whole records.
//!
//! `QANAT_MODEL_SEED=N` replays one case; `QANAT_MODEL_CASES` / `QANAT_MODEL_STEPS` resize it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_support;
mod support;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_support::{read_topic, wait_checked, Agent, Content};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{poll_until, Broker};

const WRITERS: usize = 2;

/// One content: an inode's bytes from creation (or truncation) on.
struct Live {
    path: PathBuf,
    content: usize,
}

struct Model {
    dir: PathBuf,
    contents: Vec<Content>,
    /// Active file of each writer.
    active: Vec<Option<Live>>,
    /// Rotated and copied files still on disk.
    others: Vec<Live>,
    serial: usize,
}

impl Model {
    fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }

    fn new_content(&mut self, path: &Path, bytes: Vec<u8>) -> usize {
        let m = fs::metadata(path).unwrap();
        self.contents.push(Content {
            name: path.display().to_string(),
            dev: m.dev(),
            ino: m.ino(),
            required: bytes.len() as u64,
            bytes,
        });
        self.contents.len() - 1
    }

    fn append(&mut self, rng: &mut StdRng, w: usize) {
        let n = rng.random_range(1..40);
        let mut data = Vec::new();
        for _ in 0..n {
            self.serial += 1;
            let len = if rng.random_bool(0.1) {
                0
            } else {
                rng.random_range(1..300)
            };
            let fill: String = (0..len)
                .map(|_| rng.random_range(b'a'..=b'z') as char)
                .collect();
            data.extend_from_slice(format!("{} {fill}\n", self.serial).as_bytes());
        }
        if self.active[w].is_none() {
            let path = self.logs().join(format!("app{w}.log"));
            fs::write(&path, b"").unwrap();
            let c = self.new_content(&path, Vec::new());
            self.active[w] = Some(Live { path, content: c });
        }
        let live = self.active[w].as_ref().unwrap();
        let mut f = OpenOptions::new().append(true).open(&live.path).unwrap();
        f.write_all(&data).unwrap();
        let c = &mut self.contents[live.content];
        c.bytes.extend_from_slice(&data);
        c.required = c.bytes.len() as u64;
    }

    fn rotate(&mut self, w: usize) {
        let Some(live) = self.active[w].take() else {
            return;
        };
        self.serial += 1;
        let to = self.logs().join(format!("app{w}.log.{}", self.serial));
        fs::rename(&live.path, &to).unwrap();
        self.others.push(Live {
            path: to,
            content: live.content,
        });
    }

    fn copytruncate(&mut self, w: usize) {
        let Some((path, old)) = self.active[w].as_ref().map(|l| (l.path.clone(), l.content)) else {
            return;
        };
        self.serial += 1;
        let to = self.logs().join(format!("app{w}.log.c{}", self.serial));
        let bytes = self.contents[old].bytes.clone();
        fs::write(&to, &bytes).unwrap();
        let copy = self.new_content(&to, bytes);
        self.others.push(Live {
            path: to,
            content: copy,
        });
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        // The truncated content's unread tail survives in the copy; nothing more is owed.
        self.contents[old].required = 0;
        let c = self.new_content(&path, Vec::new());
        self.active[w] = Some(Live { path, content: c });
    }
}

fn config(dir: &Path, bootstrap: &str, inotify: bool) -> String {
    format!(
        r#"
host = "model"
checkpoint_dir = "{dir}/state"
inotify = {inotify}
rescan_interval_ms = 150
poll_interval_ms = 50
checkpoint_interval_ms = 100
orphan_grace_ms = 300
signature_bytes = 64
manifest_topic = "manifest"
manifest_interval_ms = 1000

[output]
bootstrap = "{bootstrap}"
batch_age_ms = 10
batch_bytes = 4096
delivery_timeout_ms = 5000

[[source]]
paths = ["{dir}/logs/**/*.log*"]
topic = "logs"
"#,
        dir = dir.display()
    )
}

fn wait_covered(broker: &Broker, contents: &[Content], what: &str) {
    wait_checked(
        &broker.bootstrap(),
        "logs",
        contents,
        what,
        Duration::from_secs(90),
    );
}

fn run_case(seed: u64, steps: usize) {
    eprintln!("=== model case seed {seed} ({steps} steps); replay with QANAT_MODEL_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut broker = Broker::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    fs::create_dir_all(dir.join("logs")).unwrap();
    let mut agent = Agent::new(
        &dir,
        &config(&dir, &broker.bootstrap(), rng.random_bool(0.5)),
    );
    let mut model = Model {
        dir: dir.clone(),
        contents: Vec::new(),
        active: (0..WRITERS).map(|_| None).collect(),
        others: Vec::new(),
        serial: 0,
    };
    agent.start();
    for step in 0..steps {
        let w = rng.random_range(0..WRITERS);
        let op = rng.random_range(0..100);
        match op {
            0..=44 => model.append(&mut rng, w),
            45..=54 => model.rotate(w),
            55..=62 => model.copytruncate(w),
            63..=70 => {
                // Delete a file the agent holds open: it must still read it to the end. The
                // next step waits until it did, so no crash can make the loss inevitable.
                if !agent.is_running() || broker.pid().is_none() || model.others.is_empty() {
                    continue;
                }
                let i = rng.random_range(0..model.others.len());
                let live = model.others.remove(i);
                poll_until(
                    "the agent to open the file",
                    Duration::from_secs(30),
                    || {
                        if agent.has_open(&live.path) {
                            Ok(())
                        } else {
                            Err(live.path.display().to_string())
                        }
                    },
                );
                fs::remove_file(&live.path).unwrap();
                eprintln!("step {step}: deleted {}", live.path.display());
                wait_covered(
                    &broker,
                    &model.contents,
                    "the deleted file to be read to its end",
                );
            }
            71..=80 => {
                if agent.is_running() {
                    eprintln!("step {step}: kill -9 agent");
                    agent.kill9();
                } else {
                    eprintln!("step {step}: start agent");
                    agent.start();
                }
            }
            81..=88 => {
                // `Broker::pid` is `Some` exactly while the broker is started (not killed).
                if broker.pid().is_some() {
                    eprintln!("step {step}: kill -9 broker");
                    broker.kill9();
                } else {
                    eprintln!("step {step}: start broker");
                    broker.start_again();
                }
            }
            _ => std::thread::sleep(Duration::from_millis(rng.random_range(0..200))),
        }
    }
    if broker.pid().is_none() {
        broker.start_again();
    }
    if !agent.is_running() {
        agent.start();
    }
    wait_covered(
        &broker,
        &model.contents,
        "every written byte to be delivered",
    );
    let recs = read_topic(&broker.bootstrap(), "logs");
    let bytes: usize = model.contents.iter().map(|c| c.bytes.len()).sum();
    eprintln!(
        "seed {seed}: {} contents, {bytes} bytes written, {} records read back",
        model.contents.len(),
        recs.len()
    );
    agent.stop();
}

#[test]
fn random_histories_lose_no_bytes() {
    let steps = std::env::var("QANAT_MODEL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    if let Some(seed) = std::env::var("QANAT_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run_case(seed, steps);
        return;
    }
    let cases = std::env::var("QANAT_MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let base: u64 = rand::rng().random();
    for i in 0..cases {
        run_case(base.wrapping_add(i), steps);
    }
}
