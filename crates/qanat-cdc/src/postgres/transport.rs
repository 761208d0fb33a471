//! The replication connection, behind [`ReplicationStream`] so the transport can be swapped
//! without touching the pgoutput decoding.
//!
//! The implementation is `pgwire-replication` ([`PgwireStream`]). It was picked over
//! `pg_walstream` because it hands over each XLogData payload as raw bytes (so
//! [`super::pgoutput`] stays the one decoder), it has a *gated* session on which replication
//! commands (`CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT`) run before `START_REPLICATION` on
//! the same authenticated connection — which keeps the exported snapshot alive while the
//! snapshot is read — it answers keepalives and sends standby status updates carrying only
//! the flush LSN we raise, and its SCRAM is pure Rust (hmac, sha2). pg_walstream pulls in aws-lc-rs (a C build
//! on every CI run) and its API centres on its own decoded event types.
//!
//! pgwire-replication decodes Begin, Commit and logical messages itself; [`PgwireStream`]
//! re-encodes those three into their pgoutput bytes (see `pgoutput::encode_*`) so the
//! stream above sees every message in the same form.

use bytes::Bytes;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};

use super::pgoutput;

/// One CopyData message of the replication stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamMessage {
    /// An XLogData payload: one pgoutput message. `wal_start` is the LSN of the change it
    /// describes (0 when the transport does not know it).
    Data { wal_start: u64, payload: Bytes },
    /// A primary keepalive: everything the server had to send up to `wal_end` was sent.
    Keepalive { wal_end: u64 },
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(pub String);

/// A started logical replication stream.
#[allow(async_fn_in_trait)]
pub trait ReplicationStream {
    /// The next message; `Ok(None)` when the server ended the stream.
    async fn recv(&mut self) -> Result<Option<StreamMessage>, TransportError>;

    /// Report `lsn` as written and flushed in the next standby status update: the slot's
    /// `confirmed_flush_lsn` may move up to it. Monotonic; lower values are ignored.
    fn confirm_flushed(&mut self, lsn: u64);

    /// Starts streaming if it has not started yet (a transport may open gated, so that the
    /// snapshot is read before the stream is consumed).
    async fn start_streaming(&mut self) -> Result<(), TransportError>;
}

/// `pgwire-replication`'s client: gated until [`PgwireStream::start`].
pub struct PgwireStream {
    client: ReplicationClient,
    started: bool,
}

impl PgwireStream {
    /// Connects and authenticates without starting replication.
    pub async fn connect_gated(config: ReplicationConfig) -> Result<Self, TransportError> {
        let client = ReplicationClient::connect_gated(config)
            .await
            .map_err(|e| TransportError(e.to_string()))?;
        Ok(Self {
            client,
            started: false,
        })
    }

    /// A replication command (or query) on the gated session; rows as text.
    pub async fn command(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, TransportError> {
        let rows = self
            .client
            .simple_query(sql)
            .await
            .map_err(|e| TransportError(e.to_string()))?;
        Ok(rows
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
                    .collect()
            })
            .collect())
    }

    /// Sends START_REPLICATION and waits until the server accepted it.
    async fn start(&mut self) -> Result<(), TransportError> {
        if self.started {
            return Ok(());
        }
        self.client
            .start()
            .await
            .map_err(|e| TransportError(e.to_string()))?;
        self.client
            .wait_started()
            .await
            .map_err(|e| TransportError(e.to_string()))?;
        self.started = true;
        Ok(())
    }

    pub fn is_started(&self) -> bool {
        self.started
    }
}

impl ReplicationStream for PgwireStream {
    async fn recv(&mut self) -> Result<Option<StreamMessage>, TransportError> {
        loop {
            let event = self
                .client
                .recv()
                .await
                .map_err(|e| TransportError(e.to_string()))?;
            let message = match event {
                None => return Ok(None),
                Some(ReplicationEvent::KeepAlive { wal_end, .. }) => StreamMessage::Keepalive {
                    wal_end: wal_end.as_u64(),
                },
                Some(ReplicationEvent::XLogData {
                    wal_start, data, ..
                }) => StreamMessage::Data {
                    wal_start: wal_start.as_u64(),
                    payload: data,
                },
                Some(ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                }) => StreamMessage::Data {
                    wal_start: 0,
                    payload: pgoutput::encode_begin(&pgoutput::Begin {
                        final_lsn: final_lsn.as_u64(),
                        commit_time: commit_time_micros,
                        xid,
                    }),
                },
                Some(ReplicationEvent::Commit {
                    lsn,
                    end_lsn,
                    commit_time_micros,
                }) => StreamMessage::Data {
                    wal_start: 0,
                    payload: pgoutput::encode_commit(&pgoutput::Commit {
                        flags: 0,
                        commit_lsn: lsn.as_u64(),
                        end_lsn: end_lsn.as_u64(),
                        commit_time: commit_time_micros,
                    }),
                },
                Some(ReplicationEvent::Message {
                    transactional,
                    lsn,
                    prefix,
                    content,
                }) => StreamMessage::Data {
                    wal_start: lsn.as_u64(),
                    payload: pgoutput::encode_message(&pgoutput::LogicalMessage {
                        transactional,
                        lsn: lsn.as_u64(),
                        prefix,
                        content,
                    }),
                },
                // Only with a stop LSN, which the source never sets.
                Some(ReplicationEvent::StoppedAt { .. }) => continue,
            };
            return Ok(Some(message));
        }
    }

    fn confirm_flushed(&mut self, lsn: u64) {
        self.client.update_applied_lsn(Lsn::from_u64(lsn));
    }

    async fn start_streaming(&mut self) -> Result<(), TransportError> {
        self.start().await
    }
}

/// `0/16B3748` ⇄ u64.
pub fn format_lsn(lsn: u64) -> String {
    Lsn::from_u64(lsn).to_pg_string()
}

pub fn parse_lsn(text: &str) -> Option<u64> {
    Lsn::parse(text).ok().map(Lsn::as_u64)
}
