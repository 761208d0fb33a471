#!/usr/bin/env python3
"""Read partition 0 of a topic from its start to its end with one client and print every
record as a JSON line: offset, key, value and headers (in order), bytes as hex.

--client confluent: confluent-kafka (librdkafka); --client kafka-python: kafka-python's own
protocol and decompression. Exits 3 if the client library is missing (run scripts/test.sh).

Usage: dump_topic.py --bootstrap HOST:PORT --topic T --count N --client confluent|kafka-python
"""
import argparse
import json
import sys
import time

DEADLINE_S = 60


def hx(b):
    return None if b is None else bytes(b).hex()


def line(offset, key, value, headers):
    return json.dumps({
        "offset": offset,
        "key": hx(key),
        "value": hx(value),
        "headers": [[k, hx(v)] for k, v in (headers or [])],
    })


def with_confluent(bootstrap, topic, count):
    try:
        from confluent_kafka import Consumer, TopicPartition
    except ImportError as e:
        print(f"confluent-kafka is not importable ({e})", file=sys.stderr)
        sys.exit(3)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "dump-topic",
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    c.assign([TopicPartition(topic, 0, 0)])
    out, deadline = [], time.time() + DEADLINE_S
    while len(out) < count and time.time() < deadline:
        m = c.poll(1.0)
        if m is None:
            continue
        if m.error():
            raise SystemExit(f"consume error: {m.error()}")
        out.append(line(m.offset(), m.key(), m.value(), m.headers()))
    c.close()
    return out


def with_kafka_python(bootstrap, topic, count):
    try:
        from kafka import KafkaConsumer, TopicPartition
    except ImportError as e:
        print(f"kafka-python is not importable ({e})", file=sys.stderr)
        sys.exit(3)
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                      consumer_timeout_ms=1000)
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    c.seek_to_beginning(tp)
    out, deadline = [], time.time() + DEADLINE_S
    while len(out) < count and time.time() < deadline:
        for m in c.poll(timeout_ms=1000).get(tp, []):
            out.append(line(m.offset, m.key, m.value, m.headers))
    c.close()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--client", choices=["confluent", "kafka-python"], required=True)
    a = ap.parse_args()
    read = with_confluent if a.client == "confluent" else with_kafka_python
    out = read(a.bootstrap, a.topic, a.count)
    if len(out) < a.count:
        print(f"read {len(out)} of {a.count} records within {DEADLINE_S}s", file=sys.stderr)
        return 1
    print("\n".join(out[: a.count]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
