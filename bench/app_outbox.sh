#!/usr/bin/env bash
# The app's outbox (messaging.app_outbox): how fast the relay empties a PostgreSQL table into
# the embedded outbox. A real PostgreSQL (Debian's `postgresql`, initdb'd into a temp dir, run as
# the `postgres` user when this runs as root) on CPU 0, the sidecar on CPU 1. The table (its DDL
# from docs/messaging.md) is filled with ROWS rows in one transaction, then the sidecar starts and
# the time until the table is empty is taken: rows stored durably (one outbox commit per round of
# up to 500 rows) and deleted, per second. Twice: rows without an ordering key, then rows spread
# over 100 ordering keys (the held-back check runs each round).
#
#   bash bench/app_outbox.sh [ROWS]        (default 100000)
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${1:-100000}

source bench/lib.sh
bench_needs psql:postgresql-client
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || bench_needs initdb-is-missing:postgresql
bench_build
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
bench_workdir
port=18195
as_pg=()
if [[ $(id -u) == 0 ]]; then
  chown postgres:postgres "$work"
  as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups --reset-env)
fi
"${as_pg[@]}" "$bin/initdb" -D "$work/pg" -U outrigger --auth=trust -E UTF8 --no-sync >"$work/initdb.log"
taskset -c 0 "${as_pg[@]}" "$bin/postgres" -D "$work/pg" -p $port -c listen_addresses=127.0.0.1 \
  -c unix_socket_directories="$work" >"$work/postgres.log" 2>&1 &
pids+=($!)
sql() { psql -h 127.0.0.1 -p $port -U outrigger -d postgres -X -q -A -t -v ON_ERROR_STOP=1 -c "$1"; }
for _ in $(seq 100); do sql 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.1; done
sql "$(awk '/^```sql$/{on=1; next} /^```$/{if (on && ddl) exit; on=0} on && /CREATE TABLE/{ddl=1} on && ddl' docs/messaging.md)"

cat >"$work/outrigger.yaml" <<YAML
outbound: { listen: 127.0.0.1:18190 }
admin: { listen: 127.0.0.1:18191 }
service: { name: bench }
messaging:
  data_dir: $work/data
  app_outbox: { postgres: "postgres://outrigger@127.0.0.1:$port/postgres" }
telemetry: { log: { level: warn } }
YAML

# relay ROWS rows whose headers are HEADERS_SQL (an expression of g, the row's number)
drain() {
  local label=$1 headers=$2
  sql "INSERT INTO outrigger_outbox (id, queue, payload, headers, created_at)
       SELECT 'row-' || g, 'bench', '{\"order\":42,\"customer\":\"c-7\",\"items\":[{\"sku\":\"A-1\",\"qty\":2}]}',
              $headers, clock_timestamp() FROM generate_series(1, $ROWS) g"
  rm -rf "$work/data"
  local start end
  start=$(date +%s.%N)
  taskset -c 1 "$OUTRIGGER" run --config "$work/outrigger.yaml" >>"$work/outrigger.log" 2>&1 &
  local sidecar=$!
  pids+=($sidecar)
  while [[ $(sql 'SELECT count(*) FROM outrigger_outbox') != 0 ]]; do sleep 0.05; done
  end=$(date +%s.%N)
  local stored
  stored=$(curl -s http://127.0.0.1:18191/metrics | awk '/^outrigger_app_outbox_relayed_total /{print $2}')
  kill "$sidecar"; wait "$sidecar" 2>/dev/null || true
  python3 -c "print(f'$label: {$ROWS} rows in {$end - $start:.2f} s (sidecar start included): {$ROWS / ($end - $start):.0f} rows/s; relayed_total {$stored}')"
}
echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}'), $ROWS rows of a 60-byte JSON payload"
drain "no ordering key" "NULL"
drain "100 ordering keys" "jsonb_build_object('outrigger-ordering-key', 'customer-' || (g % 100))"
