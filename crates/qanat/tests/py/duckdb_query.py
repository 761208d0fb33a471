"""Run one SQL query in DuckDB (the PyPI package) and print its rows as one JSON list of
objects, column name to value; values JSON has no type for (decimals, timestamps) as text.
Usage: SQL"""

import json
import sys

import duckdb

cursor = duckdb.connect().execute(sys.argv[1])
names = [d[0] for d in cursor.description]
json.dump([dict(zip(names, row)) for row in cursor.fetchall()], sys.stdout, default=str)
