#!/usr/bin/env python3
"""Round trip through a Qanat broker with confluent-kafka (librdkafka), once per codec.

For each compression type: produce 1000 records with keys and headers to a fresh topic, wait
for every delivery report, then read the partition back with a manually assigned consumer
from offset 0 and check offsets, keys, values and headers. Exits non-zero on any mismatch.

Usage: confluent_roundtrip.py --bootstrap HOST:PORT
"""
import argparse
import sys
import time

try:
    from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
except ImportError as e:  # pragma: no cover - environment problem, not a broker problem
    print(f"confluent-kafka is not importable ({e}); run scripts/test.sh", file=sys.stderr)
    sys.exit(3)

CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]
N = 1000
DEADLINE_S = 60


def expected(codec):
    out = []
    for i in range(N):
        key = None if i % 10 == 0 else f"key-{i}".encode()
        value = f"{codec} value {i:05} ".encode() + b"payload " * (i % 25)
        headers = [("idx", str(i).encode()), ("codec", codec.encode())]
        if i % 7 == 0:
            headers.append(("null-header", None))
        out.append((key, value, headers))
    return out


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def produce(bootstrap, topic, codec, records):
    p = Producer({
        "bootstrap.servers": bootstrap,
        "broker.address.family": "v4",
        "compression.type": codec,
        "linger.ms": 20,
        "acks": "all",
        "enable.idempotence": False,
        "message.timeout.ms": DEADLINE_S * 1000,
    })
    reports = [None] * len(records)

    def on_delivery(idx):
        def cb(err, msg):
            reports[idx] = (err, None if err else (msg.partition(), msg.offset()))
        return cb

    for i, (key, value, headers) in enumerate(records):
        while True:
            try:
                p.produce(topic, value=value, key=key, headers=headers, partition=0,
                          on_delivery=on_delivery(i))
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    left = p.flush(DEADLINE_S)
    if left:
        fail(f"[{codec}] {left} records still undelivered after flush")
    for i, r in enumerate(reports):
        if r is None:
            fail(f"[{codec}] no delivery report for record {i}")
        err, where = r
        if err is not None:
            fail(f"[{codec}] record {i} not delivered: {err}")
        if where != (0, i):
            fail(f"[{codec}] record {i} delivered at {where}, expected (0, {i})")


def consume(bootstrap, topic, codec, n):
    c = Consumer({
        "bootstrap.servers": bootstrap,
        "broker.address.family": "v4",
        "group.id": "qanat-py-confluent",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "error",
        "fetch.wait.max.ms": 200,
    })
    c.assign([TopicPartition(topic, 0, 0)])
    got = []
    errors = {}
    deadline = time.monotonic() + DEADLINE_S
    while len(got) < n:
        if time.monotonic() > deadline:
            fail(f"[{codec}] consumed {len(got)} of {n} records before the deadline; errors {errors}")
        msg = c.poll(0.2)
        if msg is None:
            continue
        if msg.error():
            if msg.error().code() != KafkaError._PARTITION_EOF:
                errors[str(msg.error())] = errors.get(str(msg.error()), 0) + 1
            continue
        got.append(msg)
    c.close()
    return got


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic-prefix", default="py-confluent")
    args = ap.parse_args()
    for codec in CODECS:
        topic = f"{args.topic_prefix}-{codec}"
        records = expected(codec)
        produce(args.bootstrap, topic, codec, records)
        got = consume(args.bootstrap, topic, codec, len(records))
        for i, (msg, (key, value, headers)) in enumerate(zip(got, records)):
            if msg.offset() != i:
                fail(f"[{codec}] record {i}: offset {msg.offset()}")
            if msg.key() != key:
                fail(f"[{codec}] record {i}: key {msg.key()!r}, expected {key!r}")
            if msg.value() != value:
                fail(f"[{codec}] record {i}: value {msg.value()!r}, expected {value!r}")
            got_headers = [(k, v) for k, v in (msg.headers() or [])]
            if got_headers != headers:
                fail(f"[{codec}] record {i}: headers {got_headers!r}, expected {headers!r}")
        if len(got) != len(records):
            fail(f"[{codec}] read {len(got)} records, produced {len(records)}")
        print(f"confluent-kafka {codec}: {len(records)} records round-tripped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
