//! Stored batches decoded back into records, for the broker's own readers: push
//! subscriptions, exact seek by time and the coordinator journal. The Kafka fetch path never
//! decodes; it sends the stored bytes.

use bytes::BytesMut;
use kafka_protocol::records::{Record, RecordBatchDecoder, TimestampType};
use qanat_log::{LogError, Partition};

/// Records at or after `from`, from whole batches totalling about `max_bytes` (at least one
/// batch when there is one). Compressed batches are decompressed.
pub fn read_records(
    partition: &Partition,
    from: i64,
    max_bytes: u64,
) -> Result<Vec<Record>, LogError> {
    if from >= partition.high_watermark() {
        return Ok(Vec::new());
    }
    let read = partition.read(from, max_bytes)?;
    let mut buf = BytesMut::new();
    for s in &read.slices {
        let start = buf.len();
        buf.resize(start + s.len as usize, 0);
        s.file
            .read_exact_at(&mut buf[start..], s.position)
            .map_err(|source| LogError::Io {
                path: partition.dir().to_path_buf(),
                source,
            })?;
    }
    let mut bytes = buf.freeze();
    let sets = RecordBatchDecoder::decode_all(&mut bytes).map_err(|e| LogError::CorruptBatch {
        position: 0,
        reason: format!("stored batch does not decode: {e}"),
    })?;
    Ok(sets
        .into_iter()
        .flat_map(|s| s.records)
        .filter(|r| r.offset >= from)
        .collect())
}

/// The first record whose timestamp is at or after `ts`, as (offset, timestamp): Kafka's
/// ListOffsets by time. The log finds the batch; this looks inside it.
pub fn offset_for_timestamp(
    partition: &Partition,
    ts: i64,
) -> Result<Option<(i64, i64)>, LogError> {
    let Some((base, batch_max)) = partition.offset_for_timestamp(ts)? else {
        return Ok(None);
    };
    let records = read_records(partition, base, 1)?;
    let found = records.iter().find_map(|r| {
        // With LogAppendTime every record of a batch carries the batch's append time.
        let t = if r.timestamp_type == TimestampType::LogAppend {
            batch_max
        } else {
            r.timestamp
        };
        (t >= ts).then_some((r.offset, t))
    });
    Ok(Some(found.unwrap_or((base, batch_max))))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use qanat_log::batch::{compute_crc, encode_batch, SimpleRecord};

    #[test]
    fn forged_record_count_is_an_error_not_an_allocation() {
        // A stored batch claiming 2^31-1 records must not size an allocation from that count.
        let mut b = encode_batch(&[SimpleRecord {
            timestamp: 1,
            key: None,
            value: Some(b"v"),
        }]);
        b[57..61].copy_from_slice(&i32::MAX.to_be_bytes());
        let crc = compute_crc(&b).unwrap();
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        let mut bytes = bytes::Bytes::from(b);
        assert!(RecordBatchDecoder::decode_all(&mut bytes).is_err());
    }
}
