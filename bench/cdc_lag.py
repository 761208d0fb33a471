"""bench/cdc.sh's paced run: RATE row events/s for SECONDS into lag.t (ts = NOW(6) at insert,
a TIMESTAMP(6) the event carries in UTC), while a consumer reads cdc.lag.t; lag = the time the
record is read - ts.

One warm-up row goes first and the paced run starts once the consumer has read it: the topic
exists only after the connector's first event, and a consumer assigned to a topic that does
not exist yet finds it only at its next metadata refresh (close to a second with librdkafka's
backoff), which would otherwise be counted as the first rows' lag.

The consumer only takes the time a record is read; the JSON is parsed after the run, so the
reader does not hold the GIL the inserting thread needs. It asks for what is there every 5 ms
rather than waiting up to 50 ms for a batch of 1000.

Prints: records rate p50_ms p99_ms max_ms produce_p50_ms produce_p99_ms, where produce is
commit -> the envelope's ts_ms (when qanat cdc handed the record to its producer)."""

import datetime
import json
import sys
import threading
import time

import pymysql
from confluent_kafka import Consumer, TopicPartition

boot, port, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
total = int(rate * seconds)
read = []  # (time read, record value), warm-up row included
ready = threading.Event()


def consume():
    c = Consumer({"bootstrap.servers": boot, "group.id": "lag-bench", "enable.auto.commit": False,
                  "fetch.wait.max.ms": 5, "broker.address.family": "v4"})
    c.assign([TopicPartition("cdc.lag.t", 0, 0)])
    deadline = time.time() + seconds + 120
    while len(read) < total + 1 and time.time() < deadline:
        for m in c.consume(1000, 0.005):
            if m.error() or m.value() is None:
                continue
            read.append((time.time(), m.value()))
            ready.set()
    c.close()


reader = threading.Thread(target=consume)
reader.start()
db = pymysql.connect(host="127.0.0.1", port=port, user="cdc", password="cdc", autocommit=True)
cur = db.cursor()
cur.execute("INSERT INTO lag.t (ts, pad) VALUES (NOW(6), 'warm-up')")
if not ready.wait(60):
    sys.exit("the warm-up row was not read within 60 s")
batch = max(1, rate // 100)  # one statement every 10 ms
start = time.time()
sent = 0
while sent < total:
    cur.execute("INSERT INTO lag.t (ts, pad) VALUES " + ",".join(["(NOW(6), 'x')"] * batch))
    sent += batch
    ahead = start + sent / rate - time.time()
    if ahead > 0:
        time.sleep(ahead)
rate_done = sent / (time.time() - start)
reader.join()


def utc(text):
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


lags, produce = [], []
for now, value in read:
    event = json.loads(value)
    if event["after"]["pad"].strip() == "warm-up":
        continue
    ts = utc(event["after"]["ts"])
    lags.append(now - ts)
    produce.append(event["ts_ms"] / 1000 - ts)
lags.sort()
produce.sort()


def pct(values, q):
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


print(len(lags), rate_done, pct(lags, 0.5), pct(lags, 0.99), lags[-1] * 1000 if lags else float("nan"),
      pct(produce, 0.5), pct(produce, 0.99))
