"""bench/cdc.sh's paced run: RATE row events/s for SECONDS into lag.t (ts = NOW(6) at insert,
a TIMESTAMP(6) the event carries in UTC), while a consumer reads cdc.lag.t; lag = the time the
record is read - ts. Prints: records rate p50_ms p99_ms max_ms."""

import datetime
import json
import sys
import threading
import time

import pymysql
from confluent_kafka import Consumer, TopicPartition

boot, port, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
total = int(rate * seconds)
lags = []


def consume():
    c = Consumer({"bootstrap.servers": boot, "group.id": "lag-bench", "enable.auto.commit": False,
                  "fetch.wait.max.ms": 5, "broker.address.family": "v4"})
    c.assign([TopicPartition("cdc.lag.t", 0, 0)])
    deadline = time.time() + seconds + 120
    while len(lags) < total and time.time() < deadline:
        for m in c.consume(1000, 0.05):
            if m.error() or m.value() is None:
                continue
            now = time.time()
            ts = json.loads(m.value())["after"]["ts"]
            t = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=datetime.timezone.utc).timestamp()
            lags.append(now - t)
    c.close()


reader = threading.Thread(target=consume)
reader.start()
db = pymysql.connect(host="127.0.0.1", port=port, user="cdc", password="cdc", autocommit=True)
cur = db.cursor()
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
lags.sort()


def pct(q):
    return lags[min(len(lags) - 1, int(q * len(lags)))] * 1000 if lags else float("nan")


print(len(lags), rate_done, pct(0.5), pct(0.99), lags[-1] * 1000 if lags else float("nan"))
