"""Kafka's ACL error codes as confluent-kafka (librdkafka) and kafka-python see them, for the
APIs a client reaches without producing or fetching: FindCoordinator and OffsetFetch (a
consumer's committed offsets), ListGroups (an admin client's group listing) and InitProducerId
(an idempotent producer).

Run by the security tests against a broker with the authorizer on and a SASL_PLAINTEXT
listener, where `admin` is a super user, `alice` may write TOPIC and describe no group, `bob`
may read topics `ord*` and groups `bob-*` and nothing else. GROUP has offsets committed by bob;
HIDDEN is a topic bob may not describe.
Prints `ok` when every check holds; otherwise the failed check and exits 1.
"""

import argparse
import sys
import time

DEADLINE_S = 20

# Kafka's codes (ResponseError).
TOPIC_AUTHORIZATION_FAILED = 29
GROUP_AUTHORIZATION_FAILED = 30
CLUSTER_AUTHORIZATION_FAILED = 31


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def confluent(args):
    from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient

    def common(user):
        return {
            "bootstrap.servers": args.bootstrap,
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": user,
            "sasl.password": args.password,
        }

    def committed(user, topic):
        """The error code of reading GROUP's committed offset of TOPIC-0 as `user`."""
        c = Consumer({**common(user), "group.id": args.group, "enable.auto.commit": False})
        try:
            tps = c.committed([TopicPartition(topic, 0)], timeout=DEADLINE_S)
            err = tps[0].error
            return err.code() if err is not None else 0
        except KafkaException as e:
            return e.args[0].code()
        finally:
            c.close()

    # FindCoordinator needs Describe on the group: alice's consumer is refused before any
    # OffsetFetch (librdkafka reports it as a consumer error; `committed` just times out).
    c = Consumer({**common("alice"), "group.id": args.group, "enable.auto.commit": False})
    c.subscribe([args.topic])
    code, limit = None, time.time() + DEADLINE_S
    while code is None and time.time() < limit:
        m = c.poll(0.5)
        if m is not None and m.error():
            code = m.error().code()
    c.close()
    if code != KafkaError.GROUP_AUTHORIZATION_FAILED:
        fail(f"confluent: alice's consumer in {args.group}: {code}, "
             f"expected GROUP_AUTHORIZATION_FAILED")
    # OffsetFetch needs Describe on the topic too: bob finds his group's coordinator, and
    # the partition of a topic he may not describe comes back with its own error.
    code = committed("bob", args.hidden)
    if code != KafkaError.TOPIC_AUTHORIZATION_FAILED:
        fail(f"confluent: bob's committed offset of {args.hidden}: {code}, "
             f"expected TOPIC_AUTHORIZATION_FAILED")
    if committed("bob", args.topic) != 0:
        fail(f"confluent: bob could not read his own committed offset of {args.topic}")

    # ListGroups lists only the groups the principal may describe.
    def groups(user):
        a = AdminClient(common(user))
        result = a.list_consumer_groups(request_timeout=DEADLINE_S).result()
        if result.errors:
            fail(f"confluent: {user} listing groups: {result.errors}")
        return sorted(g.group_id for g in result.valid)

    if args.group not in groups("admin"):
        fail(f"confluent: the super user does not see {args.group}")
    if args.group not in groups("bob"):
        fail(f"confluent: bob does not see his own group {args.group}")
    if groups("alice"):
        fail(f"confluent: alice sees groups she may not describe: {groups('alice')}")

    # InitProducerId: an idempotent producer needs Write on some topic (or IdempotentWrite).
    def idempotent(user):
        errors, delivered = [], []
        p = Producer({**common(user), "enable.idempotence": True,
                      "message.timeout.ms": str(DEADLINE_S * 1000),
                      "error_cb": errors.append})
        p.produce(args.topic, b"idempotent",
                  on_delivery=lambda err, msg: delivered.append(err))
        limit = time.time() + DEADLINE_S
        while not delivered and not errors and time.time() < limit:
            try:
                p.poll(0.2)
            except KafkaException as e:  # a fatal error raised from the error callback
                errors.append(e.args[0])
        fatal = p.fatal_error() if hasattr(p, "fatal_error") else None
        p.purge()
        return errors, delivered, fatal

    errors, delivered, _ = idempotent("alice")
    if delivered != [None]:
        fail(f"confluent: alice's idempotent producer: {delivered} {errors}")
    errors, delivered, _ = idempotent("bob")
    codes = [e.code() for e in errors] + [e.code() for e in delivered if e is not None]
    text = " ".join(str(e) for e in errors + [e for e in delivered if e is not None])
    if KafkaError.CLUSTER_AUTHORIZATION_FAILED not in codes and \
            "CLUSTER_AUTHORIZATION_FAILED" not in text.upper().replace(" ", "_"):
        fail(f"confluent: bob's idempotent producer: expected CLUSTER_AUTHORIZATION_FAILED, "
             f"saw {codes} {text}")
    if None in delivered:
        fail("confluent: bob's idempotent producer delivered a record")


def kafka_python(args):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient
    from kafka import errors as Errors

    def common(user):
        return {
            "bootstrap_servers": args.bootstrap,
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": user,
            "sasl_plain_password": args.password,
        }

    def committed(user, topic):
        c = KafkaConsumer(**common(user), group_id=args.group, enable_auto_commit=False,
                          request_timeout_ms=DEADLINE_S * 1000)
        try:
            c.committed(TopicPartition(topic, 0))
            return 0
        except Errors.KafkaError as e:
            return getattr(e, "errno", None) or type(e).__name__
        finally:
            c.close()

    code = committed("alice", args.topic)
    if code != GROUP_AUTHORIZATION_FAILED:
        fail(f"kafka-python: alice's committed offsets of {args.group}: {code}, "
             f"expected GROUP_AUTHORIZATION_FAILED")
    code = committed("bob", args.hidden)
    if code != TOPIC_AUTHORIZATION_FAILED:
        fail(f"kafka-python: bob's committed offset of {args.hidden}: {code}, "
             f"expected TOPIC_AUTHORIZATION_FAILED")

    def groups(user):
        a = KafkaAdminClient(**common(user))
        try:
            return sorted(g["group_id"] for g in a.list_groups())
        finally:
            a.close()

    if args.group not in groups("admin"):
        fail(f"kafka-python: the super user does not see {args.group}")
    if args.group not in groups("bob"):
        fail(f"kafka-python: bob does not see his own group {args.group}")
    if groups("alice"):
        fail(f"kafka-python: alice sees groups she may not describe: {groups('alice')}")

    def idempotent(user):
        p = KafkaProducer(**common(user), enable_idempotence=True, acks="all",
                          max_block_ms=DEADLINE_S * 1000)
        try:
            p.send(args.topic, b"idempotent").get(timeout=DEADLINE_S)
            return 0
        except Errors.KafkaError as e:
            return getattr(e, "errno", None) or str(e)
        finally:
            p.close(timeout=1)

    if idempotent("alice") != 0:
        fail("kafka-python: alice's idempotent producer failed")
    # kafka-python wraps the InitProducerId error: "... [Error 31] ClusterAuthorizationFailedError".
    code = idempotent("bob")
    if code != CLUSTER_AUTHORIZATION_FAILED and \
            f"[Error {CLUSTER_AUTHORIZATION_FAILED}] ClusterAuthorizationFailedError" not in str(code):
        fail(f"kafka-python: bob's idempotent producer: {code}, "
             f"expected CLUSTER_AUTHORIZATION_FAILED")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--client", required=True, choices=["confluent", "kafka-python"])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--hidden", required=True)
    ap.add_argument("--group", required=True)
    args = ap.parse_args()
    (confluent if args.client == "confluent" else kafka_python)(args)
    print("ok")


if __name__ == "__main__":
    main()
