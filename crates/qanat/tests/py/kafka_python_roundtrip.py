#!/usr/bin/env python3
"""Round trip through a Qanat broker with kafka-python (a pure-Python client with its own
protocol implementation), once per codec: none, gzip, snappy, lz4, zstd.

Produces 500 keyed records with headers per codec (acks=all, no idempotence: Qanat has no
InitProducerId yet), then reads them back with KafkaConsumer using assign() +
seek_to_beginning() (no group) and checks offsets, keys, values and headers. Exits non-zero on
any mismatch; exits 3 if a codec library is missing (run scripts/test.sh).

Usage: kafka_python_roundtrip.py --bootstrap HOST:PORT
"""
import argparse
import sys
import time

try:
    import kafka.codec as codecs
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
except ImportError as e:  # pragma: no cover - environment problem, not a broker problem
    print(f"kafka-python is not importable ({e}); run scripts/test.sh", file=sys.stderr)
    sys.exit(3)

CODECS = [
    (None, lambda: True),
    ("gzip", codecs.has_gzip),
    ("snappy", codecs.has_snappy),
    ("lz4", codecs.has_lz4),
    ("zstd", codecs.has_zstd),
]
N = 500
DEADLINE_S = 60


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def expected(name):
    out = []
    for i in range(N):
        key = None if i % 10 == 0 else f"key-{i}".encode()
        value = f"{name} value {i:05} ".encode() + b"kafka-python " * (i % 20)
        headers = [("idx", str(i).encode()), ("codec", name.encode())]
        out.append((key, value, headers))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic-prefix", default="py-kafka-python")
    args = ap.parse_args()
    missing = [c for c, have in CODECS if not have()]
    if missing:
        print(f"kafka-python lacks libraries for codecs {missing}; run scripts/test.sh "
              "(pip: lz4 zstandard python-snappy)", file=sys.stderr)
        return 3
    for codec, _ in CODECS:
        name = codec or "none"
        topic = f"{args.topic_prefix}-{name}"
        records = expected(name)
        producer = KafkaProducer(
            bootstrap_servers=args.bootstrap,
            compression_type=codec,
            acks="all",
            enable_idempotence=False,
            linger_ms=20,
            request_timeout_ms=30000,
        )
        futures = [
            producer.send(topic, value=value, key=key, headers=headers, partition=0)
            for key, value, headers in records
        ]
        producer.flush(timeout=DEADLINE_S)
        for i, f in enumerate(futures):
            try:
                md = f.get(timeout=DEADLINE_S)
            except Exception as e:  # noqa: BLE001 - report whatever the client raised
                fail(f"[{name}] record {i} not delivered: {e!r}")
            if (md.partition, md.offset) != (0, i):
                fail(f"[{name}] record {i} delivered at ({md.partition}, {md.offset})")
        producer.close(timeout=10)

        consumer = KafkaConsumer(
            bootstrap_servers=args.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=200,
        )
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        got = []
        deadline = time.monotonic() + DEADLINE_S
        while len(got) < len(records):
            if time.monotonic() > deadline:
                fail(f"[{name}] consumed {len(got)} of {len(records)} before the deadline")
            for batch in consumer.poll(timeout_ms=200).values():
                got.extend(batch)
        consumer.close()
        for i, (msg, (key, value, headers)) in enumerate(zip(got, records)):
            if msg.offset != i:
                fail(f"[{name}] record {i}: offset {msg.offset}")
            if msg.key != key:
                fail(f"[{name}] record {i}: key {msg.key!r}, expected {key!r}")
            if msg.value != value:
                fail(f"[{name}] record {i}: value {msg.value!r}, expected {value!r}")
            got_headers = [(k, v) for k, v in (msg.headers or [])]
            if got_headers != headers:
                fail(f"[{name}] record {i}: headers {got_headers!r}, expected {headers!r}")
        if len(got) != len(records):
            fail(f"[{name}] read {len(got)} records, produced {len(records)}")
        print(f"kafka-python {name}: {len(records)} records round-tripped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
