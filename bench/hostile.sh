#!/usr/bin/env bash
# Load test under hostile traffic: a server with generated data runs a system export while
# CLIENTS concurrent clients poll its status and kick off exports of their own for DURATION
# seconds.
# Reports latency percentiles and checks that the export finished exact.
#
#   bench/hostile.sh                          # 200 clients, 60 s, 300 patients
#   CLIENTS=50 DURATION=20 PATIENTS=30 bench/hostile.sh
#
# Needs a Postgres at BENCH_ADMIN_URL (default postgres://postgres@127.0.0.1:5432/postgres).
# Uses (and drops) the database fhir_export_hostile; writes under bench/out/.
set -euo pipefail
cd "$(dirname "$0")/.."

PATIENTS=${PATIENTS:-300}
CLIENTS=${CLIENTS:-200}
DURATION=${DURATION:-60}
ADMIN_URL=${BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB_URL=${ADMIN_URL%/*}/fhir_export_hostile
OUT=bench/out
BIN=target/release/fhir-export
PORT=${BENCH_PORT:-18081}

cargo build --release --quiet --bin fhir-export --example hostile_load
mkdir -p "$OUT"
DATA="$OUT/data-$PATIENTS"
[ -f "$DATA/Group.ndjson" ] || "$BIN" generate --patients "$PATIENTS" --out "$DATA" >/dev/null
psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS fhir_export_hostile WITH (FORCE)"
DATABASE_URL="$DB_URL" "$BIN" load "$DATA" >"$OUT/hostile-load.log" 2>&1

rm -rf "$OUT/hostile-exports"
DATABASE_URL="$DB_URL" FHIR_EXPORT_LISTEN="127.0.0.1:$PORT" \
  FHIR_EXPORT_STORAGE_DIR="$OUT/hostile-exports" FHIR_EXPORT_PART_SIZE=1000 \
  "$BIN" serve >"$OUT/hostile-server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$PORT/health" >/dev/null && break
  sleep 0.2
done

target/release/examples/hostile_load --base "http://127.0.0.1:$PORT" --database "$DB_URL" \
  --clients "$CLIENTS" --seconds "$DURATION"
