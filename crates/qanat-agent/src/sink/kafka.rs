//! The librdkafka sink: a `ThreadedProducer` (idempotent, `acks=all`), whose delivery reports
//! arrive on librdkafka's polling thread and are handed to the loop through a mutex-protected
//! list.
//!
//! Records go through `rd_kafka_producev` directly rather than `BaseProducer::send`: with a
//! topic handle made once per topic (`rd_kafka_topic_new`; `send` looks the topic up by name
//! and allocates its name for every record) and the headers added straight to librdkafka's
//! list (no Rust-side header vector). librdkafka still copies the payload and allocates each
//! header: its API has no way around either.
//!
//! The delivery opaque is a plain `usize`, so producing a record allocates nothing for it:
//! bits 56..64 the producer generation, 32..56 the file key, 0..32 the record's sequence
//! number modulo 2^32. Keys are unique among tracked files (the loop allocates them); reports
//! of an older producer (before a restart) are dropped.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::raw::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::bindings::rd_kafka_vtype_t::{
    RD_KAFKA_VTYPE_END, RD_KAFKA_VTYPE_HEADERS, RD_KAFKA_VTYPE_KEY, RD_KAFKA_VTYPE_MSGFLAGS,
    RD_KAFKA_VTYPE_OPAQUE, RD_KAFKA_VTYPE_RKT, RD_KAFKA_VTYPE_VALUE,
};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use super::{Delivery, Record, SendError, Sink, SinkError, Waker, FILE_KEY_MASK};
use crate::config::OutputConfig;

/// The manifest's key in the opaque: never given to a file.
const MANIFEST_KEY: u64 = FILE_KEY_MASK;

const _: () = assert!(
    usize::BITS >= 64,
    "the delivery opaque packs 64 bits into a usize"
);

fn tag(generation: u64, key: u64, seq: u64) -> usize {
    (((generation & 0xff) << 56) | ((key & FILE_KEY_MASK) << 32) | (seq & 0xffff_ffff)) as usize
}

struct Ctx {
    /// Reports as (opaque, delivered).
    acks: Mutex<Vec<(u64, bool)>>,
    /// Set while the loop sleeps: the next report wakes it.
    waiting: AtomicBool,
    wake: Waker,
}

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{log_message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{log_message}"),
            _ => tracing::debug!(target: "librdkafka", fac, "{log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", %error, "{reason}");
    }
}

impl ProducerContext for Ctx {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: usize) {
        let ok = result.is_ok();
        if let Err((e, _)) = result {
            tracing::debug!(error = %e, "record not delivered");
        }
        self.acks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((tag as u64, ok));
        // Ordered by the `acks` lock against the loop's `park`; the plain load spares a
        // read-modify-write per record while the loop is busy.
        if self.waiting.load(Ordering::Acquire) && self.waiting.swap(false, Ordering::AcqRel) {
            (self.wake)();
        }
    }
}

/// A librdkafka topic handle, destroyed before its producer (field order in [`KafkaSink`]).
struct TopicHandle(*mut rdsys::rd_kafka_topic_t);

impl Drop for TopicHandle {
    fn drop(&mut self) {
        // SAFETY: the handle came from `rd_kafka_topic_new` and is destroyed once, while its
        // producer is alive.
        unsafe { rdsys::rd_kafka_topic_destroy(self.0) }
    }
}

pub struct KafkaSink {
    /// Declared before `producer`: dropped first.
    topics: HashMap<String, TopicHandle>,
    producer: ThreadedProducer<Ctx>,
    generation: u64,
    output: OutputConfig,
    host: String,
    max_inflight: u64,
    wake: Waker,
    reports: Vec<(u64, bool)>,
}

impl KafkaSink {
    /// A producer to `output.bootstrap`, its queue sized from `max_inflight` bytes.
    pub fn new(
        output: &OutputConfig,
        host: &str,
        max_inflight: u64,
        wake: Waker,
    ) -> Result<KafkaSink, SinkError> {
        let producer = make_producer(output, host, max_inflight, wake.clone())?;
        Ok(KafkaSink {
            topics: HashMap::new(),
            producer,
            generation: 0,
            output: output.clone(),
            host: host.to_string(),
            max_inflight,
            wake,
            reports: Vec::new(),
        })
    }
}

fn make_producer(
    out: &OutputConfig,
    host: &str,
    max_inflight: u64,
    wake: Waker,
) -> Result<ThreadedProducer<Ctx>, KafkaError> {
    let mut c = ClientConfig::new();
    let kbytes = (max_inflight.saturating_mul(2) / 1024).clamp(16 << 10, 2 << 20);
    c.set("bootstrap.servers", &out.bootstrap)
        .set("client.id", format!("qanat-agent-{host}"))
        // Retries neither reorder nor duplicate: the broker checks producer sequences.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("batch.size", out.batch_bytes.to_string())
        .set("linger.ms", out.batch_age_ms.to_string())
        .set("compression.type", &out.compression)
        .set("compression.level", out.compression_level.to_string())
        .set("message.timeout.ms", out.delivery_timeout_ms.to_string())
        .set(
            "message.max.bytes",
            (out.batch_bytes + (1 << 20)).max(1_000_000).to_string(),
        )
        .set("queue.buffering.max.messages", "2000000")
        .set("queue.buffering.max.kbytes", kbytes.to_string())
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "5000");
    out.security
        .apply("output.security", &mut c)
        .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
    for (k, v) in &out.librdkafka {
        c.set(k, v);
    }
    c.create_with_context(Ctx {
        acks: Mutex::new(Vec::new()),
        waiting: AtomicBool::new(false),
        wake,
    })
}

fn send_error(e: KafkaError) -> SendError {
    match e {
        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => SendError::Full,
        e => SendError::Refused(e.to_string()),
    }
}

impl KafkaSink {
    /// The cached handle of `topic`, made on first use.
    fn topic(&mut self, topic: &str) -> Result<*mut rdsys::rd_kafka_topic_t, SendError> {
        if let Some(t) = self.topics.get(topic) {
            return Ok(t.0);
        }
        let name = CString::new(topic)
            .map_err(|_| SendError::Refused(format!("topic name {topic:?} holds a NUL byte")))?;
        // SAFETY: a valid producer and a NUL-terminated name; a null conf takes the defaults.
        let rkt = unsafe {
            rdsys::rd_kafka_topic_new(
                self.producer.client().native_ptr(),
                name.as_ptr(),
                std::ptr::null_mut(),
            )
        };
        if rkt.is_null() {
            return Err(SendError::Refused(format!(
                "librdkafka refused topic {topic:?}"
            )));
        }
        self.topics.insert(topic.to_string(), TopicHandle(rkt));
        Ok(rkt)
    }

    /// One `rd_kafka_producev`; `headers` (owned, may be null) passes to librdkafka on
    /// success and is destroyed here on failure.
    fn produce(
        &mut self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        opaque: usize,
        headers: *mut rdsys::rd_kafka_headers_t,
    ) -> Result<(), SendError> {
        let rkt = match self.topic(topic) {
            Ok(rkt) => rkt,
            Err(e) => {
                if !headers.is_null() {
                    // SAFETY: still ours: never handed to librdkafka.
                    unsafe { rdsys::rd_kafka_headers_destroy(headers) };
                }
                return Err(e);
            }
        };
        // SAFETY: the vararg list follows librdkafka's `rd_kafka_producev` contract (type tag,
        // then that tag's arguments, ending with END); RD_KAFKA_MSG_F_COPY makes librdkafka copy
        // key and payload before returning, so the borrowed slices may go.
        let err = unsafe {
            rdsys::rd_kafka_producev(
                self.producer.client().native_ptr(),
                RD_KAFKA_VTYPE_RKT,
                rkt,
                RD_KAFKA_VTYPE_MSGFLAGS,
                rdsys::RD_KAFKA_MSG_F_COPY,
                RD_KAFKA_VTYPE_VALUE,
                payload.as_ptr() as *mut c_void,
                payload.len(),
                RD_KAFKA_VTYPE_KEY,
                key.as_ptr() as *const c_void,
                key.len(),
                RD_KAFKA_VTYPE_OPAQUE,
                opaque as *mut c_void,
                RD_KAFKA_VTYPE_HEADERS,
                headers,
                RD_KAFKA_VTYPE_END,
            )
        };
        if err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Ok(());
        }
        if !headers.is_null() {
            // SAFETY: librdkafka takes the headers only on success.
            unsafe { rdsys::rd_kafka_headers_destroy(headers) };
        }
        Err(send_error(KafkaError::MessageProduction(err.into())))
    }
}

impl Sink for KafkaSink {
    fn send(&mut self, r: &Record<'_>) -> Result<(), SendError> {
        let t = &r.trajectory;
        // SAFETY: a fresh list, filled with (pointer, length) pairs librdkafka copies.
        let headers = unsafe { rdsys::rd_kafka_headers_new(t.header_count()) };
        t.fold_headers((), |(), key, value| {
            // SAFETY: as above; the only failure (read-only list) cannot happen to a new one.
            unsafe {
                rdsys::rd_kafka_header_add(
                    headers,
                    key.as_ptr().cast(),
                    key.len() as isize,
                    value.as_ptr().cast(),
                    value.len() as isize,
                );
            }
        });
        let opaque = tag(self.generation, r.file_key, r.seq);
        self.produce(r.topic, t.file_id.as_bytes(), r.payload, opaque, headers)
    }

    fn send_manifest(&mut self, topic: &str, key: &[u8], payload: &[u8]) -> Result<(), SendError> {
        let opaque = tag(self.generation, MANIFEST_KEY, 0);
        self.produce(topic, key, payload, opaque, std::ptr::null_mut())
    }

    fn drain(&mut self, out: &mut Vec<Delivery>) {
        std::mem::swap(
            &mut *self
                .producer
                .context()
                .acks
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            &mut self.reports,
        );
        let generation = (self.generation & 0xff) as u8;
        out.extend(self.reports.drain(..).filter_map(|(tag, ok)| {
            let key = (tag >> 32) & FILE_KEY_MASK;
            if (tag >> 56) as u8 != generation || key == MANIFEST_KEY {
                return None;
            }
            Some(Delivery {
                file_key: key,
                seq: tag & 0xffff_ffff,
                ok,
            })
        }));
    }

    fn flush(&mut self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }

    fn restart_if_broken(&mut self) -> bool {
        let Some((code, reason)) = self.producer.client().fatal_error() else {
            return false;
        };
        tracing::error!(?code, %reason, "fatal producer error: recreating the producer and re-reading from acknowledged positions");
        match make_producer(
            &self.output,
            &self.host,
            self.max_inflight,
            self.wake.clone(),
        ) {
            Ok(p) => {
                self.topics.clear();
                self.producer = p;
                self.generation += 1;
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "recreating the producer failed; will retry");
                false
            }
        }
    }

    fn park(&self) -> bool {
        let ctx = self.producer.context();
        ctx.waiting.store(true, Ordering::Release);
        !ctx.acks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    fn unpark(&self) {
        self.producer
            .context()
            .waiting
            .store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_opaque_packs_generation_key_and_sequence() {
        let t = tag(0x1ff, 0xabcdef, 0x1_2345_6789) as u64;
        assert_eq!(t >> 56, 0xff);
        assert_eq!((t >> 32) & FILE_KEY_MASK, 0xabcdef);
        assert_eq!(t & 0xffff_ffff, 0x2345_6789);
    }
}
