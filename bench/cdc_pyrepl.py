"""bench/cdc.sh's peer: python-mysql-replication reads a MariaDB binlog from its first byte to
its current end (non-blocking) and counts the row events. Prints: rows seconds."""

import sys
import time

from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

port, first = int(sys.argv[1]), sys.argv[2]
t0 = time.time()
stream = BinLogStreamReader(
    connection_settings={"host": "127.0.0.1", "port": port, "user": "cdc", "passwd": "cdc"},
    server_id=4242,
    log_file=first,
    log_pos=4,
    resume_stream=True,
    blocking=False,
    is_mariadb=True,
    only_events=[WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent],
)
rows = 0
for event in stream:
    rows += len(event.rows)
stream.close()
print(rows, time.time() - t0)
