#!/usr/bin/env python3
"""One confluent-kafka group consumer with synchronous per-record commits, driven by
crates/qanat/tests/groups.rs.

The consumer subscribes to TOPIC in GROUP and, for every record, commits offset+1
synchronously; only after that commit succeeded is the record counted as processed (printed).
A failed commit seeks back to the record, so it is delivered again (to this consumer, or to
the partition's next owner, which starts from the committed offset). Hence across a group:
every record is reported processed exactly once, if the broker's coordinator is right.

Everything observable goes to stdout as one JSON object per line, flushed at once:
  {"ev": "assigned", "parts": [0, 3], "t": EPOCH_S}     (rebalance callback)
  {"ev": "revoked",  "parts": [0, 3], "t": EPOCH_S}
  {"ev": "processed", "p": P, "o": O, "v": VALUE}       (after a successful sync commit)
  {"ev": "commit_failed", "p": P, "o": O, "err": "..."}
  {"ev": "parked", "t": EPOCH_S}    (--park-after N: stops polling after N records; the test
                                     SIGKILLs it there, i.e. between two commits)
  {"ev": "done", "processed": N}    (stop file appeared: close() = LeaveGroup, exit 0)
Exit codes: 0 done, 1 failure, 3 confluent-kafka missing.

Usage: group_consumers.py --bootstrap HOST:PORT --topic T --group G --client-id ID
                          --stop-file PATH [--park-after N] [--session-timeout-ms MS]
                          [--heartbeat-ms MS]
"""
import argparse
import json
import os
import sys
import time

try:
    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
except ImportError as e:  # pragma: no cover - environment problem, not a broker problem
    print(f"confluent-kafka is not importable ({e}); run scripts/test.sh", file=sys.stderr)
    sys.exit(3)


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--client-id", required=True)
    ap.add_argument("--stop-file", required=True)
    ap.add_argument("--park-after", type=int, default=0)
    ap.add_argument("--session-timeout-ms", type=int, default=4000)
    ap.add_argument("--heartbeat-ms", type=int, default=400)
    args = ap.parse_args()

    c = Consumer({
        "bootstrap.servers": args.bootstrap,
        "broker.address.family": "v4",
        "group.id": args.group,
        "client.id": args.client_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": args.session_timeout_ms,
        "heartbeat.interval.ms": args.heartbeat_ms,
        "reconnect.backoff.max.ms": 500,
        "fetch.wait.max.ms": 100,
        "topic.metadata.refresh.interval.ms": 2000,
        "error_cb": lambda err: print(f"[{args.client_id}] error_cb: {err}", file=sys.stderr),
    })

    def on_assign(consumer, parts):
        emit({"ev": "assigned", "parts": sorted(p.partition for p in parts), "t": time.time()})

    def on_revoke(consumer, parts):
        emit({"ev": "revoked", "parts": sorted(p.partition for p in parts), "t": time.time()})

    c.subscribe([args.topic], on_assign=on_assign, on_revoke=on_revoke)
    processed = 0
    while True:
        msg = c.poll(0.1)
        if msg is None:
            if os.path.exists(args.stop_file):
                break
            continue
        if msg.error():
            if msg.error().code() != KafkaError._PARTITION_EOF:
                print(f"[{args.client_id}] consume error: {msg.error()}", file=sys.stderr)
            continue
        p, o = msg.partition(), msg.offset()
        err = None
        try:
            res = c.commit(message=msg, asynchronous=False)
            bad = [tp for tp in (res or []) if tp.error is not None]
            if bad:
                err = "; ".join(f"{tp.partition}: {tp.error}" for tp in bad)
        except KafkaException as e:
            err = str(e)
        if err is not None:
            emit({"ev": "commit_failed", "p": p, "o": o, "err": err})
            try:
                c.seek(TopicPartition(args.topic, p, o))
            except KafkaException as e:  # no longer assigned: its next owner re-reads it
                print(f"[{args.client_id}] seek back to {p}:{o}: {e}", file=sys.stderr)
            continue
        value = msg.value().decode() if msg.value() is not None else None
        emit({"ev": "processed", "p": p, "o": o, "v": value})
        processed += 1
        if args.park_after and processed >= args.park_after:
            emit({"ev": "parked", "t": time.time()})
            # Stop polling; librdkafka's background thread keeps heartbeating, so the group
            # stays stable until the test SIGKILLs this process.
            while True:
                time.sleep(0.05)
    c.close()
    emit({"ev": "done", "processed": processed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
