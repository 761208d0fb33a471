//! End-to-end tests of `qanat agent` against the real broker: discovery without inotify,
//! corrupt checkpoints under both policies, rotation to a non-matching name and deletion
//! while the agent still holds the file open, a line far longer than `max_line_bytes` that
//! has no newline yet (also across a restart), and a final checkpoint that cannot be written.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_support;
mod support;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use agent_support::{check, read_topic, wait_checked, wait_checkpointed, Agent, Content, Record};
use support::{poll_until, Broker, Tmpfs};

fn config(dir: &Path, bootstrap: &str, extra: &str) -> String {
    format!(
        r#"
host = "it"
checkpoint_dir = "{dir}/state"
rescan_interval_ms = 200
poll_interval_ms = 50
checkpoint_interval_ms = 100
orphan_grace_ms = 1000
manifest_topic = "manifest"
manifest_interval_ms = 500
{extra}
[output]
bootstrap = "{bootstrap}"
batch_age_ms = 20

[[source]]
paths = ["{dir}/logs/**/*.log"]
topic = "logs"
attributes = {{ service = "checkout", env = "test" }}
"#,
        dir = dir.display()
    )
}

fn content(path: &Path) -> Content {
    let m = fs::metadata(path).unwrap();
    Content {
        name: path.display().to_string(),
        dev: m.dev(),
        ino: m.ino(),
        bytes: fs::read(path).unwrap(),
        required: m.len(),
    }
}

fn lines(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("{prefix} line {i} {}\n", "x".repeat(i % 50)))
        .collect()
}

fn wait_delivered(broker: &Broker, contents: &[Content]) -> Vec<Record> {
    wait_checked(
        &broker.bootstrap(),
        "logs",
        contents,
        "every byte delivered",
        Duration::from_secs(60),
    )
}

#[test]
fn collects_every_file_with_inotify_disabled() {
    let broker = Broker::start();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::create_dir_all(d.join("logs")).unwrap();
    fs::write(d.join("logs/before.log"), lines("before", 100)).unwrap();
    let mut agent = Agent::new(d, &config(d, &broker.bootstrap(), "inotify = false"));
    agent.start();
    // Files in sub-directories created after the start, a file shorter than the signature,
    // an empty file that gets bytes later, a file that does not match.
    fs::create_dir_all(d.join("logs/a/b/c")).unwrap();
    fs::write(d.join("logs/a/b/c/deep.log"), lines("deep", 500)).unwrap();
    fs::write(d.join("logs/a/short.log"), "tiny\n").unwrap();
    fs::write(d.join("logs/a/empty.log"), "").unwrap();
    fs::write(d.join("logs/a/skip.txt"), "not collected\n").unwrap();
    let mut f = OpenOptions::new()
        .append(true)
        .open(d.join("logs/before.log"))
        .unwrap();
    f.write_all(lines("after", 50).as_bytes()).unwrap();
    poll_until(
        "the agent to open empty.log",
        Duration::from_secs(30),
        || {
            if agent.has_open(&d.join("logs/a/empty.log")) {
                Ok(())
            } else {
                Err("not open".to_string())
            }
        },
    );
    fs::write(d.join("logs/a/empty.log"), "now it has bytes\n").unwrap();

    let contents: Vec<Content> = ["before.log", "a/b/c/deep.log", "a/short.log", "a/empty.log"]
        .iter()
        .map(|p| content(&d.join("logs").join(p)))
        .collect();
    let recs = wait_delivered(&broker, &contents);
    let r = &recs[0];
    assert_eq!(r.h("qanat.host"), "it");
    assert_eq!(r.h("service"), "checkout");
    assert_eq!(r.h("env"), "test");
    assert!(r.h("qanat.path").ends_with(".log"));
    assert!(!recs.iter().any(|r| r.value.starts_with(b"not collected")));
    let short = recs.iter().find(|r| r.value == b"tiny").unwrap();
    assert!(
        short.h("qanat.file").ends_with("-5"),
        "short file signs its 5 bytes: {}",
        short.h("qanat.file")
    );
    // Manifests list the files with their ids.
    let manifest = poll_until("a manifest with 4 files", Duration::from_secs(30), || {
        read_topic(&broker.bootstrap(), "manifest")
            .into_iter()
            .rev()
            .find(|m| {
                serde_json::from_slice::<serde_json::Value>(&m.value).unwrap()["files"]
                    .as_array()
                    .unwrap()
                    .len()
                    == 4
            })
            .ok_or_else(|| "no manifest with 4 files yet".to_string())
    });
    let v: serde_json::Value = serde_json::from_slice(&manifest.value).unwrap();
    assert_eq!(v["host"], "it");
    assert_eq!(manifest.key, b"it");
    assert!(agent.is_running());
    agent.stop();
    let stderr = fs::read_to_string(&agent.stderr).unwrap();
    assert!(stderr.contains("inotify disabled"), "{stderr}");
}

#[test]
fn corrupt_checkpoint_is_detected_and_handled_by_policy() {
    let broker = Broker::start();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::create_dir_all(d.join("logs")).unwrap();
    let path = d.join("logs/app.log");
    fs::write(&path, lines("app", 200)).unwrap();
    let mut agent = Agent::new(d, &config(d, &broker.bootstrap(), ""));
    agent.start();
    let contents = vec![content(&path)];
    let first = wait_delivered(&broker, &contents);
    agent.stop();
    let ckpt = d.join("state/checkpoint");
    let mut bytes = fs::read(&ckpt).unwrap();
    assert!(bytes.starts_with(b"qanat-agent-checkpoint v1 "));
    // Flip one digit of the offset in the body: a plausible-looking but wrong position.
    let at = bytes.windows(9).position(|w| w == b"\"offset\":").unwrap() + 9;
    bytes[at] = if bytes[at] == b'1' { b'2' } else { b'1' };
    fs::write(&ckpt, &bytes).unwrap();

    // stop: refuses to start, says why, non-zero exit.
    let (status, stderr) = agent.run_to_exit();
    assert_eq!(status.code(), Some(3), "stderr:\n{stderr}");
    assert!(
        stderr.contains("is corrupt") && stderr.contains("checksum mismatch"),
        "{stderr}"
    );
    assert!(stderr.contains(&ckpt.display().to_string()), "{stderr}");
    assert_eq!(
        read_topic(&broker.bootstrap(), "logs").len(),
        first.len(),
        "nothing produced"
    );

    // reread: reports it, keeps the damaged file, reads the file again from 0.
    let mut agent = Agent::new(
        d,
        &config(d, &broker.bootstrap(), "on_corrupt_checkpoint = \"reread\""),
    );
    agent.start();
    let all = poll_until("the file re-read from 0", Duration::from_secs(60), || {
        let recs = read_topic(&broker.bootstrap(), "logs");
        if recs.len() >= 2 * first.len() {
            Ok(recs)
        } else {
            Err(format!("{} records", recs.len()))
        }
    });
    check(&contents, &all).map_err(|e| e.1).unwrap();
    assert_eq!(all.iter().filter(|r| r.h("qanat.offset") == "0").count(), 2);
    agent.stop();
    let stderr = fs::read_to_string(&agent.stderr).unwrap();
    assert!(stderr.contains("CHECKPOINT IS CORRUPT"), "{stderr}");
    let aside = fs::read_dir(d.join("state")).unwrap().flatten().any(|e| {
        e.file_name()
            .to_string_lossy()
            .starts_with("checkpoint.corrupt-")
    });
    assert!(aside, "the damaged checkpoint is kept for inspection");
}

#[test]
fn renamed_away_and_deleted_files_are_read_to_their_end() {
    let broker = Broker::start();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::create_dir_all(d.join("logs")).unwrap();
    let app = d.join("logs/app.log");
    let del = d.join("logs/gone.log");
    let mut w_app = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&app)
        .unwrap();
    let mut w_del = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&del)
        .unwrap();
    w_app.write_all(lines("app", 100).as_bytes()).unwrap();
    w_del.write_all(lines("del", 100).as_bytes()).unwrap();
    let mut agent = Agent::new(d, &config(d, &broker.bootstrap(), ""));
    agent.start();
    poll_until(
        "the agent to open both files",
        Duration::from_secs(30),
        || {
            if agent.has_open(&app) && agent.has_open(&del) {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    );
    let app_meta = fs::metadata(&app).unwrap();
    let del_meta = fs::metadata(&del).unwrap();
    // Rotate to a name the glob does not match; the writer keeps writing a little to the old
    // file (as loggers do until they reopen), then a new app.log appears.
    fs::rename(&app, d.join("logs/app.log.1")).unwrap();
    fs::remove_file(&del).unwrap();
    w_app.write_all(lines("late-app", 300).as_bytes()).unwrap();
    w_del.write_all(lines("late-del", 300).as_bytes()).unwrap();
    fs::write(&app, lines("new", 10)).unwrap();

    let old_app = Content {
        name: "app.log (rotated)".into(),
        dev: app_meta.dev(),
        ino: app_meta.ino(),
        bytes: fs::read(d.join("logs/app.log.1")).unwrap(),
        required: 0,
    };
    let mut old_app = old_app;
    old_app.required = old_app.bytes.len() as u64;
    let mut gone = Content {
        name: "gone.log (deleted)".into(),
        dev: del_meta.dev(),
        ino: del_meta.ino(),
        bytes: lines("del", 100).into_bytes(),
        required: 0,
    };
    gone.bytes
        .extend_from_slice(lines("late-del", 300).as_bytes());
    gone.required = gone.bytes.len() as u64;
    wait_delivered(&broker, &[old_app, gone, content(&app)]);
    // Once read to the end and acknowledged, they are closed.
    poll_until("the orphans to be closed", Duration::from_secs(30), || {
        if agent.has_open(&del) || agent.has_open(&d.join("logs/app.log.1")) {
            Err("still open".to_string())
        } else {
            Ok(())
        }
    });
    agent.stop();
}

/// The default `max_line_bytes`.
const MAX_LINE: u64 = 256 << 10;

/// `n` bytes of one line without a newline, varied so a misplaced piece shows.
fn long_line(from: u64, n: u64) -> Vec<u8> {
    (from..from + n).map(|i| b'a' + (i % 23) as u8).collect()
}

fn append(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(bytes).unwrap();
}

/// Every record of `path` read back must tile it byte for byte up to `required`; the long
/// line's records starting in `[line_start, required)` are pieces of exactly `MAX_LINE` bytes
/// in which no line ends, except the one ending at a newline.
fn check_long_line(broker: &Broker, path: &Path, line_start: u64, pieces_end: u64, required: u64) {
    let mut c = content(path);
    c.required = required;
    let recs = read_topic(&broker.bootstrap(), "logs");
    check(&[c], &recs).map_err(|e| e.1).unwrap();
    // Every record inside the cut part of the line is a whole piece without a line end.
    let mut pieces = 0;
    for r in &recs {
        let offset = r.num("qanat.offset");
        if offset >= line_start && offset < pieces_end {
            assert_eq!(r.num("qanat.size"), MAX_LINE, "piece at {offset}");
            assert_eq!(r.num("qanat.lines"), 0, "piece at {offset}");
            pieces += 1;
        }
    }
    assert_eq!(
        pieces,
        (pieces_end - line_start) / MAX_LINE,
        "pieces of the long line"
    );
}

#[test]
fn a_long_line_without_newline_is_cut_at_max_line_bytes() {
    let broker = Broker::start();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::create_dir_all(d.join("logs")).unwrap();
    let path = d.join("logs/app.log");
    // The line starts where a read starts, so the first read holds exactly `MAX_LINE` bytes
    // of it: not yet known to be too long.
    let line_start = 0;
    let line_len = 50 * (1 << 20) + 12_345;
    fs::write(&path, long_line(0, line_len)).unwrap();
    let mut agent = Agent::new(d, &config(d, &broker.bootstrap(), ""));
    agent.start();

    // Every whole piece is collected and acknowledged while the newline is still missing;
    // only the last, shorter part of the line waits for it.
    let pieces_end = line_start + (line_len - 1) / MAX_LINE * MAX_LINE;
    let acked = wait_checkpointed(&d.join("state"), &path, pieces_end);
    assert_eq!(acked, pieces_end, "nothing past the last whole piece");
    check_long_line(&broker, &path, line_start, pieces_end, pieces_end);

    // The newline arrives, and lines after it flow.
    append(&path, format!("\n{}", lines("after", 100)).as_bytes());
    let end = fs::metadata(&path).unwrap().len();
    wait_checkpointed(&d.join("state"), &path, end);
    check_long_line(&broker, &path, line_start, pieces_end, end);
    agent.stop();
}

#[test]
fn a_long_line_without_newline_continues_across_a_restart() {
    let broker = Broker::start();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::create_dir_all(d.join("logs")).unwrap();
    let path = d.join("logs/app.log");
    let head = lines("head", 3).into_bytes();
    let line_start = head.len() as u64;
    let first = 10 * (1 << 20) + 100;
    let mut bytes = head;
    bytes.extend_from_slice(&long_line(0, first));
    fs::write(&path, &bytes).unwrap();
    let mut agent = Agent::new(d, &config(d, &broker.bootstrap(), ""));
    agent.start();
    wait_checkpointed(
        &d.join("state"),
        &path,
        line_start + (first - 1) / MAX_LINE * MAX_LINE,
    );
    agent.stop();

    // While the agent is down the line grows, still without a newline; the agent resumes in
    // the middle of it.
    let rest = 40 * (1 << 20);
    append(&path, &long_line(first, rest));
    agent.start();
    let line_len = first + rest;
    let pieces_end = line_start + (line_len - 1) / MAX_LINE * MAX_LINE;
    let acked = wait_checkpointed(&d.join("state"), &path, pieces_end);
    assert_eq!(acked, pieces_end);
    check_long_line(&broker, &path, line_start, pieces_end, pieces_end);

    append(&path, format!("\n{}", lines("after", 100)).as_bytes());
    let end = fs::metadata(&path).unwrap().len();
    wait_checkpointed(&d.join("state"), &path, end);
    check_long_line(&broker, &path, line_start, pieces_end, end);
    agent.stop();
}

#[test]
fn a_final_checkpoint_on_a_full_disk_is_reported_and_fails_the_exit() {
    let broker = Broker::start();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::create_dir_all(d.join("logs")).unwrap();
    let path = d.join("logs/app.log");
    fs::write(&path, lines("app", 100)).unwrap();
    let disk = Tmpfs::mount(256 << 10);
    let state = disk.path().join("state");
    let toml = config(d, &broker.bootstrap(), "").replace(
        &format!("checkpoint_dir = \"{}/state\"", d.display()),
        &format!("checkpoint_dir = \"{}\"", state.display()),
    );
    let mut agent = Agent::new(d, &toml);
    agent.start();
    wait_delivered(&broker, &[content(&path)]);
    wait_checkpointed(&state, &path, fs::metadata(&path).unwrap().len());

    disk.fill("filler");
    let status = agent.terminate();
    let stderr = fs::read_to_string(&agent.stderr).unwrap();
    assert!(!status.success(), "exit {status}; stderr:\n{stderr}");
    assert!(stderr.contains("final checkpoint NOT written"), "{stderr}");
    assert!(
        stderr.contains(&state.join("checkpoint.tmp").display().to_string()),
        "the error names the file: {stderr}"
    );
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(!stderr.contains("final checkpoint written"), "{stderr}");
}

/// `(key, value, headers in order)` of every record, as one client read them.
type Dumped = Vec<(String, String, Vec<(String, String)>)>;

fn unhex(s: &str) -> String {
    let bytes: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect();
    String::from_utf8(bytes).unwrap()
}

fn dump_with_python(bootstrap: &str, topic: &str, count: usize, client: &str) -> Dumped {
    let out = std::process::Command::new("python3")
        .arg(support::py_script("dump_topic.py"))
        .args(["--bootstrap", bootstrap, "--topic", topic])
        .args(["--count", &count.to_string(), "--client", client])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dump_topic.py --client {client}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let headers = v["headers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| {
                    (
                        h[0].as_str().unwrap().to_string(),
                        unhex(h[1].as_str().unwrap()),
                    )
                })
                .collect();
            (
                unhex(v["key"].as_str().unwrap()),
                unhex(v["value"].as_str().unwrap()),
                headers,
            )
        })
        .collect()
}

fn dump_with_kcat(bootstrap: &str, topic: &str, count: usize) -> Dumped {
    let out = std::process::Command::new("kcat")
        .args([
            "-C",
            "-b",
            bootstrap,
            "-t",
            topic,
            "-p",
            "0",
            "-o",
            "beginning",
        ])
        .args(["-c", &count.to_string(), "-e", "-J"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kcat -C: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let flat: Vec<String> = v["headers"]
                .as_array()
                .map(|h| h.iter().map(|x| x.as_str().unwrap().to_string()).collect())
                .unwrap_or_default();
            let headers = flat
                .chunks(2)
                .map(|kv| (kv[0].clone(), kv[1].clone()))
                .collect();
            (
                v["key"].as_str().unwrap().to_string(),
                v["payload"].as_str().unwrap().to_string(),
                headers,
            )
        })
        .collect()
}

/// The native producer (the default) writes record batches that kcat, confluent-kafka
/// (librdkafka) and kafka-python (its own decoder) all read back as exactly the lines of the
/// file with their trajectory headers in order, for every codec it writes; batches span
/// several LZ4 blocks (64 KiB) and the file several batches.
#[test]
fn native_batches_read_back_identically_through_kcat_confluent_and_kafka_python() {
    support::require_kcat();
    support::require_python_modules(&["confluent_kafka", "kafka", "lz4", "zstandard"]);
    let broker = Broker::start();
    let b = broker.bootstrap();
    for codec in ["lz4", "zstd", "gzip", "none"] {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        fs::create_dir_all(d.join("logs")).unwrap();
        let text: String = (0..3000)
            .map(|i| format!("{codec} línea {i:05} {}\n", "é.x".repeat(i % 70)))
            .collect();
        let path = d.join("logs/app.log");
        fs::write(&path, &text).unwrap();
        let topic = format!("native-{codec}");
        let toml = config(d, &b, "inotify = false")
            .replace("topic = \"logs\"", &format!("topic = \"{topic}\""))
            .replace(
                "batch_age_ms = 20",
                &format!("batch_age_ms = 20\nbatch_bytes = 131072\ncompression = \"{codec}\""),
            );
        let mut agent = Agent::new(d, &toml);
        agent.start();
        let recs = wait_checked(
            &b,
            &topic,
            &[content(&path)],
            "every line delivered",
            Duration::from_secs(60),
        );
        agent.stop();
        let id = recs[0].h("qanat.file").to_string();
        let mut offset = 0;
        let want: Dumped = text
            .lines()
            .map(|l| {
                let h = [
                    ("qanat.host", "it".to_string()),
                    ("qanat.file", id.clone()),
                    ("qanat.path", path.display().to_string()),
                    ("qanat.offset", offset.to_string()),
                    ("qanat.size", (l.len() + 1).to_string()),
                    ("qanat.lines", "1".to_string()),
                    ("env", "test".to_string()),
                    ("service", "checkout".to_string()),
                ];
                offset += l.len() + 1;
                (
                    id.clone(),
                    l.to_string(),
                    h.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
                )
            })
            .collect();
        let n = want.len();
        for (client, got) in [
            ("kcat", dump_with_kcat(&b, &topic, n)),
            (
                "confluent-kafka",
                dump_with_python(&b, &topic, n, "confluent"),
            ),
            (
                "kafka-python",
                dump_with_python(&b, &topic, n, "kafka-python"),
            ),
        ] {
            assert_eq!(
                got.len(),
                n,
                "{client} ({codec}) read {} records",
                got.len()
            );
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "{client} ({codec}), record {i}");
            }
        }
    }
}

/// What only librdkafka does (here snappy) with the native producer chosen outright is
/// refused when the configuration is read, naming the key to change (`auto`, the default,
/// ships through librdkafka instead).
#[test]
fn the_native_producer_with_what_only_librdkafka_does_is_refused_at_startup() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::create_dir_all(d.join("logs")).unwrap();
    let toml = config(d, "127.0.0.1:1", "").replace(
        "[output]\n",
        "[output]\nproducer = \"native\"\ncompression = \"snappy\"\n",
    );
    assert!(toml.contains("producer = \"native\""));
    let agent = Agent::new(d, &toml);
    let (status, stderr) = agent.run_to_exit();
    assert!(!status.success(), "the agent started: {stderr}");
    assert!(
        stderr.contains("output.producer") && stderr.contains("librdkafka"),
        "the refusal names output.producer: {stderr}"
    );
}
