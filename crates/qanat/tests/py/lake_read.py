"""Read every change-log file under a directory with pyarrow and print one JSON object:
{"files": [{"path", "rows", "metadata": {...}, "columns": [[name, type], ...]}],
 "rows": [{column: value, ...}, ...]}. Timestamps are printed as epoch milliseconds,
decimals as text. Temporary files (.tmp-*) are listed under "tmp"."""

import decimal
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq


def plain(v):
    if isinstance(v, decimal.Decimal):
        return str(v)
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


def main(root):
    out = {"files": [], "rows": [], "tmp": []}
    for dirpath, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            if name.startswith(".tmp-"):
                out["tmp"].append(path)
                continue
            if not name.endswith(".parquet"):
                continue
            pf = pq.ParquetFile(path)
            meta = {
                k.decode(): v.decode()
                for k, v in (pf.metadata.metadata or {}).items()
                if k.decode().startswith("qanat.")
            }
            table = pf.read()
            cols = []
            for field in table.schema:
                cols.append([field.name, str(field.type)])
                if pa.types.is_timestamp(field.type):
                    i = table.schema.get_field_index(field.name)
                    table = table.set_column(i, field.name, table.column(i).cast(pa.int64()))
            out["files"].append(
                {"path": os.path.relpath(path, root), "rows": table.num_rows, "metadata": meta, "columns": cols}
            )
            for row in table.to_pylist():
                out["rows"].append({k: plain(v) for k, v in row.items()})
    json.dump(out, sys.stdout)


main(sys.argv[1])
