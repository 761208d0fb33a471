//! `qanat-agent`: the log agent (SYSTEM.md B1–B6). It tails the files matching configured
//! globs, cuts them into events (lines or multiline groups), and produces one record per event
//! through librdkafka to any Kafka-protocol endpoint, with the trajectory headers of
//! `docs/trajectory.md` (host, file id, path, byte offset, byte size, line count).
//!
//! What it owns:
//! * [`config`]: the TOML configuration with `QANAT_AGENT_*` environment overrides.
//! * [`discovery`]: glob matching, the periodic rescan and the inotify watcher (never alone).
//! * [`identity`]: file ids `HOST:DEV:INODE:CRC-LEN` over the first bytes of a file.
//! * [`framing`]: lines, maximum line length and multiline grouping, as byte ranges.
//! * [`checkpoint`]: the durable per-file positions, behind [`checkpoint::CheckpointFs`].
//! * [`tracker`]: one file's delivery state without I/O: read position, records handed out
//!   with their sequence numbers and byte ranges, the acknowledged watermark, the read rule.
//! * [`sink`]: where records go, as a trait: send, delivery reports, flush, refusal. The
//!   librdkafka producer ([`sink::kafka`]) is one sink, [`sink::memory`] another for tests.
//! * [`agent`]: the loop tying them together: discovery, reading, framing, handing records
//!   to the sink, checkpoints, manifests, shutdown.
//!
//! On-disk checkpoint (`<checkpoint_dir>/checkpoint`), replaced atomically (write a temp file,
//! fsync it, rename over, fsync the directory):
//!
//! ```text
//! qanat-agent-checkpoint v1 <body length> <crc32c of body, 8 hex digits>\n
//! {"host":"web7","files":[{"id":"web7:2049:131075:9a1b2c3d-1024","path":"/var/log/app.log",
//!   "dev":2049,"ino":131075,"sig_len":1024,"sig_crc":2585734205,"offset":52311}]}
//! ```
//!
//! Invariants:
//! * A file's checkpointed `offset` is its acknowledged watermark: every record covering bytes
//!   below it was acknowledged by the broker (at-least-once). Reading runs ahead of it, bounded
//!   by `max_inflight_bytes`.
//! * A record covers exactly `[offset, offset + size)` of its file; the records of one file id
//!   tile the file from 0. After a crash the agent resumes at the watermark, so a repeat is
//!   always a whole record, never a partial one.
//! * A checkpoint that fails its length, checksum or syntax check is never used to skip data:
//!   the agent stops or re-reads from 0, by `on_corrupt_checkpoint`.

pub mod agent;
pub mod checkpoint;
pub mod clock;
pub mod config;
pub mod discovery;
pub mod framing;
pub mod identity;
pub mod sink;
pub mod tracker;

pub use agent::{run, Agent, AgentError};
pub use checkpoint::{CheckpointError, CheckpointFs, OsCheckpointFs};
pub use clock::{Clock, SystemClock};
pub use config::{AgentConfig, ConfigError, CorruptPolicy};
pub use sink::{Sink, SinkError};
pub use tracker::FileTracker;
