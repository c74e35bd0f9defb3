#!/usr/bin/env bash
# Load and export benchmark, side by side with raw Postgres COPY of the same rows.
#
#   bench/run.sh                 # 3000 patients, about a million resources
#   PATIENTS=300 bench/run.sh    # a smaller run
#
# Needs a Postgres at BENCH_ADMIN_URL (default postgres://postgres@127.0.0.1:5432/postgres) and
# psql. Uses (and drops) the database fhir_export_bench; writes under bench/out/.
set -euo pipefail
cd "$(dirname "$0")/.."

PATIENTS=${PATIENTS:-3000}
ADMIN_URL=${BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB_URL=${ADMIN_URL%/*}/fhir_export_bench
OUT=bench/out
BIN=target/release/fhir-export
PORT=${BENCH_PORT:-18080}

cargo build --release --quiet
mkdir -p "$OUT"
now() { date +%s.%N; }
rate() { awk -v n="$1" -v s="$2" 'BEGIN { if (s + 0 > 0) printf "%.0f", n / s; else printf "-" }'; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# 1. Data: generated once per size and kept.
DATA="$OUT/data-$PATIENTS"
if [ ! -f "$DATA/Group.ndjson" ]; then
  rm -rf "$DATA"
  "$BIN" generate --patients "$PATIENTS" --out "$DATA" >/dev/null
fi
RESOURCES=$(cat "$DATA"/*.ndjson | wc -l)
echo "data: $PATIENTS patients, $RESOURCES resources, $(du -sh "$DATA" | cut -f1)"

# BENCH_EXPORT_ONLY=1 reuses the database of the previous run and measures export alone.
if [ -z "${BENCH_EXPORT_ONLY:-}" ]; then
psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS fhir_export_bench WITH (FORCE)"
DATABASE_URL="$DB_URL" "$BIN" migrate 2>/dev/null

# 2. Load through fhir-export, then raw COPY FROM of the very rows it stored.
t0=$(now)
DATABASE_URL="$DB_URL" "$BIN" load "$DATA" >"$OUT/load.log" 2>&1
t1=$(now)
LOAD_SECS=$(secs "$t0" "$t1")
psql -q "$DB_URL" -c "\copy (SELECT resource_type, id, version_id, seq, last_updated, is_current, patient_ids, body FROM resources) TO '$OUT/rows.copy'"
psql -q "$DB_URL" -c "CREATE TABLE plain (LIKE resources)"
t0=$(now)
psql -q "$DB_URL" -c "\copy plain FROM '$OUT/rows.copy'"
t1=$(now)
COPY_IN_SECS=$(secs "$t0" "$t1")
psql -q "$DB_URL" -c "DROP TABLE plain"
rm -f "$OUT/rows.copy"
psql -q "$DB_URL" -c "VACUUM ANALYZE resources"
else
  LOAD_SECS=nan COPY_IN_SECS=nan
fi

# 3. Export through the server (default workers) vs raw COPY TO STDOUT of the stored JSON.
# export_run LABEL QUERY [ENV=VALUE …]: one system export; sets EXPORT_SECS, EXPORTED, RSS_KB.
export_run() {
  local label=$1 query=$2
  shift 2
  rm -rf "$OUT/exports"
  env DATABASE_URL="$DB_URL" FHIR_EXPORT_LISTEN="127.0.0.1:$PORT" FHIR_EXPORT_STORAGE_DIR="$OUT/exports" "$@" \
    "$BIN" serve >"$OUT/serve-$label.log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
  local t0 t1 status
  t0=$(now)
  status=$(curl -sf -D - -o /dev/null -H 'Accept: application/fhir+json' -H 'Prefer: respond-async' \
    "http://127.0.0.1:$PORT/\$export$query" | tr -d '\r' | awk 'tolower($1) == "content-location:" { print $2 }')
  until [ "$(curl -s -o "$OUT/manifest.json" -w "%{http_code}" "$status")" = 200 ]; do sleep 0.1; done
  t1=$(now)
  EXPORT_SECS=$(secs "$t0" "$t1")
  EXPORTED=$(python3 -c "import json; print(sum(o['count'] for o in json.load(open('$OUT/manifest.json'))['output']))")
  RSS_KB=$(awk '/VmHWM/ { print $2 }' /proc/$SERVER/status)
  kill $SERVER; wait $SERVER 2>/dev/null || true
  trap - EXIT
}

export_run filesystem ""
FS_SECS=$EXPORT_SECS FS_RSS_KB=$RSS_KB FS_EXPORTED=$EXPORTED
ON_DISK=$(cat $(find "$OUT/exports" -name '*.ndjson') | wc -l)
[ "$EXPORTED" = "$ON_DISK" ] || { echo "manifest counts $EXPORTED but files hold $ON_DISK" >&2; exit 1; }

# The same export into Azurite, when one answers at 127.0.0.1:10000 (scripts/test starts one).
AZ_SECS=skipped
if curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:10000/devstoreaccount1?comp=list | grep -q 403; then
  export_run azure "" FHIR_EXPORT_STORAGE=azure AZURE_STORAGE_CONNECTION_STRING=UseDevelopmentStorage=true
  AZ_SECS=$EXPORT_SECS AZ_RSS_KB=$RSS_KB
fi

# A `_typeFilter` export: every Observation is parsed and tested; one LOINC code matches.
export_run filtered "?_type=Observation&_typeFilter=Observation%3Fcode%3Dhttp%3A%2F%2Floinc.org%7C8867-4"
FILTER_SECS=$EXPORT_SECS FILTER_MATCHED=$EXPORTED
OBSERVATIONS=$(wc -l <"$DATA/Observation.ndjson")

t0=$(now)
psql -q "$DB_URL" -c "COPY (SELECT body FROM resources WHERE is_current AND body IS NOT NULL) TO STDOUT" >/dev/null
t1=$(now)
COPY_OUT_SECS=$(secs "$t0" "$t1")

echo
printf "%-34s %10s %14s\n" "" "seconds" "resources/s"
printf "%-34s %10s %14s\n" "fhir-export load" "$LOAD_SECS" "$(rate "$RESOURCES" "$LOAD_SECS")"
printf "%-34s %10s %14s\n" "raw COPY FROM (plain table)" "$COPY_IN_SECS" "$(rate "$RESOURCES" "$COPY_IN_SECS")"
printf "%-34s %10s %14s\n" "fhir-export \$export (filesystem)" "$FS_SECS" "$(rate "$FS_EXPORTED" "$FS_SECS")"
if [ "$AZ_SECS" != skipped ]; then
  printf "%-34s %10s %14s\n" "fhir-export \$export (Azurite)" "$AZ_SECS" "$(rate "$FS_EXPORTED" "$AZ_SECS")"
fi
printf "%-34s %10s %14s\n" "\$export _typeFilter (scanned/s)" "$FILTER_SECS" "$(rate "$OBSERVATIONS" "$FILTER_SECS")"
printf "%-34s %10s %14s\n" "raw COPY (SELECT body) TO STDOUT" "$COPY_OUT_SECS" "$(rate "$FS_EXPORTED" "$COPY_OUT_SECS")"
echo "filter: $FILTER_MATCHED of $OBSERVATIONS Observations matched"
echo "load/raw: $(awk -v a="$COPY_IN_SECS" -v b="$LOAD_SECS" 'BEGIN { if (b + 0 > 0) printf "%.2f", a / b; else printf "-" }')" \
  " export/raw: $(awk -v a="$COPY_OUT_SECS" -v b="$FS_SECS" 'BEGIN { printf "%.2f", a / b }')" \
  " server peak RSS: $((FS_RSS_KB / 1024)) MB${AZ_RSS_KB:+ (Azurite run: $((AZ_RSS_KB / 1024)) MB)}"
