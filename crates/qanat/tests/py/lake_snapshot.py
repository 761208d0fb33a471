"""Write a day's snapshot partition the way `qanat lake merge` lays it out (delete mode
keep, no base): per primary key the latest change of the day's change log by (_partition,
_offset); data columns, then _op, _deleted, _log_time, _log_pos, _partition, _offset; one
part-00000.parquet and a _SUCCESS manifest. Usage: CHANGES_DAY_DIR SNAPSHOT_DIR TABLE DS
[DROP_KEY ...] — keys (text) left out of the snapshot on purpose."""

import hashlib
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

changes, out, table, ds = sys.argv[1:5]
drop = set(sys.argv[5:])
tables = []
pk = None
for dirpath, _, names in os.walk(changes):
    for name in sorted(names):
        if name.endswith(".parquet") and not name.startswith("."):
            pf = pq.ParquetFile(os.path.join(dirpath, name))
            pk = pf.metadata.metadata[b"qanat.primary_key"].decode().split(",")
            tables.append(pf.read())
rows = pa.concat_tables(tables).to_pylist()
latest = {}
for r in sorted(rows, key=lambda r: (r["_partition"], r["_offset"])):
    latest[tuple(str(r[c]) for c in pk)] = r
keep = [r for k, r in latest.items() if ",".join(k) not in drop]
data_cols = [f.name for f in tables[0].schema if not f.name.startswith("_")]
cols = {c: [r[c] for r in keep] for c in data_cols}
schema = [tables[0].schema.field(c) for c in data_cols]
cols["_op"] = [r["_op"] for r in keep]
cols["_deleted"] = [r["_op"] == "d" for r in keep]
cols["_log_time"] = [r["_log_time"] for r in keep]
cols["_log_pos"] = [r["_log_pos"] for r in keep]
cols["_partition"] = [r["_partition"] for r in keep]
cols["_offset"] = [r["_offset"] for r in keep]
schema += [
    pa.field("_op", pa.string()),
    pa.field("_deleted", pa.bool_()),
    tables[0].schema.field("_log_time"),
    pa.field("_log_pos", pa.string()),
    pa.field("_partition", pa.int32()),
    pa.field("_offset", pa.int64()),
]
t = pa.table(cols, schema=pa.schema(schema))
os.makedirs(out, exist_ok=True)
path = os.path.join(out, "part-00000.parquet")
pq.write_table(t, path)
digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
manifest = {
    "table": table, "ds": ds, "rows": t.num_rows,
    "files": [{"name": "part-00000.parquet", "bytes": os.path.getsize(path), "rows": t.num_rows, "sha256": digest}],
    "sources": [], "delete_mode": "keep", "created_at": "2026-11-30T00:00:00Z",
}
with open(os.path.join(out, "_SUCCESS"), "w") as f:
    json.dump(manifest, f)
