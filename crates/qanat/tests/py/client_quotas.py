#!/usr/bin/env python3
"""Client quotas through kafka-python's protocol classes (its admin client has no quota
methods; confluent-kafka has none either), sent on the admin client's connection.

describe: print every quota as one JSON object per line:
  {"entity": {"user": "alice", "client-id": null}, "values": {"producer_byte_rate": 1024.0}}
alter: set KEY=VALUE (or remove KEY with --remove) for the entity given with --user /
  --client-id (the literal "<default>" is the default entity).

Usage: client_quotas.py --bootstrap HOST:PORT describe
       client_quotas.py --bootstrap HOST:PORT alter --user U [--client-id C] KEY=VALUE… [--remove KEY…]
"""
import argparse
import json
import sys

from kafka import KafkaAdminClient
from kafka.protocol.admin import AlterClientQuotasRequest, DescribeClientQuotasRequest


def entity_name(value):
    return None if value == "<default>" else value


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bootstrap", required=True)
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("describe")
    alter = sub.add_parser("alter")
    alter.add_argument("--user")
    alter.add_argument("--client-id")
    alter.add_argument("--remove", action="append", default=[])
    alter.add_argument("values", nargs="*")
    args = p.parse_args()

    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap, request_timeout_ms=30000)
    send = lambda request: admin._manager.run(admin._manager.send, request)
    if args.action == "describe":
        seen = {}
        for kind in ("user", "client-id"):
            component = DescribeClientQuotasRequest.ComponentData(
                entity_type=kind, match_type=2, match=None
            )
            resp = send(DescribeClientQuotasRequest(components=[component], strict=False))
            if resp.error_code != 0:
                print(f"FAIL: describe error {resp.error_code}: {resp.error_message}", file=sys.stderr)
                sys.exit(1)
            for entry in resp.entries or []:
                entity = {e.entity_type: e.entity_name for e in entry.entity}
                values = {v.key: v.value for v in entry.values}
                seen[json.dumps(entity, sort_keys=True)] = {"entity": entity, "values": values}
        for key in sorted(seen):
            print(json.dumps(seen[key], sort_keys=True))
        return
    Entry = AlterClientQuotasRequest.EntryData
    entity = []
    if args.user is not None:
        entity.append(Entry.EntityData(entity_type="user", entity_name=entity_name(args.user)))
    if args.client_id is not None:
        entity.append(
            Entry.EntityData(entity_type="client-id", entity_name=entity_name(args.client_id))
        )
    ops = []
    for pair in args.values:
        key, value = pair.split("=", 1)
        ops.append(Entry.OpData(key=key, value=float(value), remove=False))
    for key in args.remove:
        ops.append(Entry.OpData(key=key, value=0.0, remove=True))
    resp = send(AlterClientQuotasRequest(entries=[Entry(entity=entity, ops=ops)], validate_only=False))
    for e in resp.entries:
        if e.error_code != 0:
            print(f"FAIL: alter error {e.error_code}: {e.error_message}", file=sys.stderr)
            sys.exit(1)
    print("altered")


if __name__ == "__main__":
    main()
