#!/usr/bin/env bash
# Two builds of outrigger, one after the other in interleaved rounds, each relaying to its own
# fresh redis-server (appendonly yes, appendfsync always): durable publishes/s at 64 publishers
# with `broker: redis://`, how long the relay took to empty the outbox after the load, and the
# messages relayed per second over load and catch-up. What docs/BENCHMARKS.md compares relay
# changes with (one script call per message, then per chunk).
#
#   bash bench/relay_ab.sh BEFORE_BINARY AFTER_BINARY [ROUNDS] [SECONDS]
#
# wrk on CPU 0; the sidecar and redis-server on CPU 1, as in bench/publish.sh. All traffic stays
# on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=${1:?the first binary}
AFTER=${2:?the second binary}
ROUNDS=${3:-3}
SECONDS_PER_RUN=${4:-10}

source bench/lib.sh
bench_needs wrk:wrk redis-server:redis-server
bench_workdir

publish_lua "$work/publish.lua"

# one LABEL BINARY: a fresh Redis and a fresh outbox, the load, the catch-up; one line
one() {
  local label=$1 binary=$2 redis sidecar line rps p99 catch_up relayed
  rm -rf "$work/redis" "$work/data"
  mkdir -p "$work/redis"
  taskset -c 1 redis-server --port 18193 --bind 127.0.0.1 --dir "$work/redis" --appendonly yes \
    --appendfsync always --save "" --daemonize no >"$work/redis.log" 2>&1 &
  redis=$!
  pids+=("$redis")
  for _ in $(seq 100); do redis-cli -p 18193 PING >/dev/null 2>&1 && break; sleep 0.1; done
  cat >"$work/outrigger.yaml" <<YAML
outbound: { listen: 127.0.0.1:18190 }
admin: { listen: 127.0.0.1:18191 }
service: { name: bench }
messaging: { broker: "redis://127.0.0.1:18193", data_dir: $work/data }
telemetry: { log: { level: warn } }
YAML
  taskset -c 1 "$binary" run --config "$work/outrigger.yaml" >>"$work/outrigger.log" 2>&1 &
  sidecar=$!
  pids+=("$sidecar")
  for _ in $(seq 100); do curl -fs http://127.0.0.1:18191/readyz >/dev/null && break; sleep 0.1; done
  taskset -c 0 wrk -t1 -c1 -d1s -s "$work/publish.lua" http://127.0.0.1:18190/v1/publish/bench >/dev/null
  local before_load
  before_load=$(redis-cli -p 18193 XLEN 'outrigger:{bench}')
  line=$(taskset -c 0 wrk -t2 -c64 -d"${SECONDS_PER_RUN}s" -s "$work/publish.lua" \
    http://127.0.0.1:18190/v1/publish/bench | grep '^RESULT')
  read -r _ rps _ p99 _ <<<"$line"
  catch_up=$(outbox_catch_up)
  relayed=$(($(redis-cli -p 18193 XLEN 'outrigger:{bench}') - before_load))
  python3 -c "
catch_up = $catch_up
print(f'$label: {$rps} publishes/s (p99 {$p99} ms), relay caught up {catch_up:.1f} s after, {$relayed / ($SECONDS_PER_RUN + catch_up):.0f} relayed/s over load and catch-up')
"
  kill "$sidecar" "$redis"
  wait "$sidecar" "$redis" 2>/dev/null || true
}

for round in $(seq "$ROUNDS"); do
  echo "round $round"
  one before "$BEFORE"
  one after "$AFTER"
done
