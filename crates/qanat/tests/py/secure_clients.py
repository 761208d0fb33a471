#!/usr/bin/env python3
"""Produce and consume through a Qanat broker over SASL (and TLS) with confluent-kafka or
kafka-python.

--expect ok: produce N records to a fresh topic, read them back from offset 0, check them.
--expect refused: try to produce and to read; succeed only if both are refused (nothing
delivered, nothing read) within the deadline.

Usage: secure_clients.py --client confluent|kafka-python --bootstrap HOST:PORT
       --protocol SASL_SSL --mechanism SCRAM-SHA-512 --user U --password P [--ca FILE]
       --topic T --expect ok|refused
"""
import argparse
import sys
import time

N = 50
DEADLINE_S = 60
REFUSAL_S = 10


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def values(topic):
    return [f"{topic} secure value {i}".encode() for i in range(N)]


def confluent(args):
    from confluent_kafka import Consumer, Producer, TopicPartition

    client_errors = []
    common = {
        "bootstrap.servers": args.bootstrap,
        "security.protocol": args.protocol,
        "sasl.mechanism": args.mechanism,
        "sasl.username": args.user,
        "sasl.password": args.password,
        "error_cb": lambda e: client_errors.append(str(e)),
    }
    if args.ca:
        common["ssl.ca.location"] = args.ca
    if args.expect == "refused":
        confluent_refused(args, common, client_errors)
        return
    errors = []
    delivered = []

    def report(err, msg):
        if err is not None:
            errors.append(str(err))
        else:
            delivered.append(msg.offset())

    p = Producer({**common, "message.timeout.ms": str(DEADLINE_S * 1000), "acks": "all"})
    for v in values(args.topic):
        p.produce(args.topic, v, on_delivery=report)
    p.flush(DEADLINE_S)
    if errors or len(delivered) != N:
        fail(f"delivered {len(delivered)}/{N}, errors: {errors[:3]}")

    c = Consumer({**common, "group.id": f"secure-{args.topic}", "enable.auto.commit": False,
                  "auto.offset.reset": "earliest"})
    c.assign([TopicPartition(args.topic, 0, 0)])
    got = []
    limit = time.time() + DEADLINE_S
    while len(got) < N and time.time() < limit:
        m = c.poll(0.5)
        if m is None or m.error():
            continue
        got.append(m.value())
    c.close()
    if got != values(args.topic):
        fail(f"read {len(got)} records, expected {N} in order")


def confluent_refused(args, common, client_errors):
    """Produce one record and read from offset 0: each must fail with a client error
    (authentication, TLS or transport) and deliver or return nothing."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    delivered = []
    p = Producer({**common, "message.timeout.ms": str(REFUSAL_S * 1000)})
    p.produce(args.topic, b"must not arrive",
              on_delivery=lambda err, msg: delivered.append(err is None))
    limit = time.time() + REFUSAL_S
    while not client_errors and not delivered and time.time() < limit:
        p.poll(0.2)
    if any(delivered):
        fail("a record was delivered although refusal was expected")
    if not client_errors:
        fail("the producer saw no error although refusal was expected")
    print(f"producer refused: {client_errors[0]}", file=sys.stderr)
    p.purge()
    client_errors.clear()
    c = Consumer({**common, "group.id": f"refused-{args.topic}", "enable.auto.commit": False})
    c.assign([TopicPartition(args.topic, 0, 0)])
    limit = time.time() + REFUSAL_S
    while not client_errors and time.time() < limit:
        m = c.poll(0.2)
        if m is not None and not m.error():
            fail("read a record although refusal was expected")
    c.close()
    if not client_errors:
        fail("the consumer saw no error although refusal was expected")
    print(f"consumer refused: {client_errors[0]}", file=sys.stderr)


def kafka_python(args):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.errors import KafkaError

    common = {
        "bootstrap_servers": args.bootstrap,
        "security_protocol": args.protocol,
        "sasl_mechanism": args.mechanism,
        "sasl_plain_username": args.user,
        "sasl_plain_password": args.password,
    }
    if args.ca:
        common["ssl_cafile"] = args.ca
        common["ssl_check_hostname"] = True
    if args.expect == "refused":
        for what in ("producer", "consumer"):
            try:
                if what == "producer":
                    p = KafkaProducer(**common, max_block_ms=REFUSAL_S * 1000,
                                      request_timeout_ms=5000)
                    p.send(args.topic, b"must not arrive").get(timeout=REFUSAL_S)
                else:
                    c = KafkaConsumer(**common, enable_auto_commit=False,
                                      request_timeout_ms=5000)
                    tp = TopicPartition(args.topic, 0)
                    c.assign([tp])
                    c.seek(tp, 0)
                    if any(c.poll(timeout_ms=REFUSAL_S * 1000).values()):
                        fail("kafka-python read records although refusal was expected")
                    fail("kafka-python consumer saw no error although refusal was expected")
            except Exception as e:  # any refusal will do; success is the failure
                print(f"{what} refused: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            fail(f"kafka-python {what} succeeded although refusal was expected")
        return
    p = KafkaProducer(**common, acks="all")
    for v in values(args.topic):
        p.send(args.topic, v).get(timeout=DEADLINE_S)
    p.close()
    c = KafkaConsumer(**common, enable_auto_commit=False, consumer_timeout_ms=DEADLINE_S * 1000)
    tp = TopicPartition(args.topic, 0)
    c.assign([tp])
    c.seek(tp, 0)
    got = []
    limit = time.time() + DEADLINE_S
    while len(got) < N and time.time() < limit:
        for records in c.poll(timeout_ms=500).values():
            got.extend(r.value for r in records)
    c.close()
    if got != values(args.topic):
        fail(f"kafka-python read {len(got)} records, expected {N} in order")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--client", required=True, choices=["confluent", "kafka-python"])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--protocol", default="SASL_SSL")
    ap.add_argument("--mechanism", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--ca")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--expect", required=True, choices=["ok", "refused"])
    args = ap.parse_args()
    (confluent if args.client == "confluent" else kafka_python)(args)
    print("ok")


if __name__ == "__main__":
    main()
