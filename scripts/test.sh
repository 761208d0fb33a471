#!/usr/bin/env bash
# Qanat's test command (README, CI): installs what the integration tests need when it is
# missing, checks formatting and lints (warnings are errors), then runs every test of the
# workspace. Safe to run again and again: nothing is
# installed twice, and apt-get update runs only when something has to be installed.
#
#   kcat                      (Debian package)  used by crates/qanat/tests/clients.rs
#   postgresql                (Debian package)  server binaries (initdb, postgres) for the private
#                             wal_level=logical instances of crates/qanat/tests/cdc_postgres.rs
#   chromium                  (Debian package)  headless browser for crates/qanat/tests/collect.rs
#   mariadb-server, -client   (Debian packages) private servers for crates/qanat/tests/cdc_mysql.rs
#   libssl-dev, pkg-config    (Debian packages) OpenSSL for librdkafka's TLS and SCRAM (rdkafka's
#                             `ssl` feature: the qanat clients speak SASL_SSL)
#   confluent-kafka, kafka-python, lz4, zstandard, python-snappy   (pip, for the python3 on
#                             PATH, which is the one the tests run)
#   pyarrow                   (pip) reads back the Parquet written by crates/qanat/tests/sync.rs
#                             and the lake tests
#   duckdb                    (pip) runs the README's lake queries in crates/qanat/tests/lake_e2e.rs
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo -n "$@"
  else
    echo "scripts/test.sh: need root to run: $*" >&2
    return 1
  fi
}

if ! command -v kcat >/dev/null 2>&1; then
  echo "scripts/test.sh: installing kcat" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends kcat </dev/null
fi

if ! command -v chromium >/dev/null 2>&1; then
  echo "scripts/test.sh: installing chromium" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium </dev/null
fi

# Any installed major version will do: the tests look for /usr/lib/postgresql/<version>/bin.
if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null \
   || ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  echo "scripts/test.sh: installing the PostgreSQL server" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql </dev/null
fi

if ! command -v mariadbd >/dev/null 2>&1 || ! command -v mariadb-install-db >/dev/null 2>&1 \
   || ! command -v mariadb >/dev/null 2>&1; then
  echo "scripts/test.sh: installing mariadb-server" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    mariadb-server mariadb-client </dev/null
fi

if ! pkg-config --exists openssl 2>/dev/null; then
  echo "scripts/test.sh: installing libssl-dev and pkg-config" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    libssl-dev pkg-config </dev/null
fi

missing=()
# pip package : module it provides
for spec in confluent-kafka:confluent_kafka kafka-python:kafka lz4:lz4 zstandard:zstandard \
            python-snappy:snappy pyarrow:pyarrow duckdb:duckdb; do
  if ! python3 -c "import ${spec##*:}" >/dev/null 2>&1; then
    missing+=("${spec%%:*}")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "scripts/test.sh: installing Python packages: ${missing[*]}" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    "${missing[@]}" </dev/null
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets --no-fail-fast
