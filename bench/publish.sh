#!/usr/bin/env bash
# Durable publish benchmark: POST /v1/publish/bench with a small JSON payload, answered 202 only
# after the message's commit (fsync) in the embedded store, with 1 and 64 concurrent publishers
# (wrk connections, one request in flight each). Also times the disk's own fsync, for comparison:
# one publisher cannot beat one fsync per message; many publishers share one (group commit).
# Then the front door alone (a malformed body answered 400 before the store), the ceiling of any
# store behind it on the same CPU. Then delivery: the sidecar restarts with a subscription on the queue the publishes filled, and
# delivers to a local app (an nginx worker answering 200) with concurrency 64 for the same time;
# each acknowledgement is a durable commit, shared like the publishes'.
# Then the same through Redis (redis-server with appendonly yes, appendfsync always, on CPU 1):
# redis-benchmark's raw XADD at 1 and 64 clients as the broker's own limit, publishes with
# `broker: redis://`, the relay's catch-up, and delivery through a consumer group; and again on
# a three-node Redis Cluster (`broker: redis+cluster://`, every node on CPU 1); and through NATS
# JetStream (nats-server on CPU 1, `broker: nats://`), its own limit measured by a JetStream
# publish loop (proxy/examples/jetstream_publish.rs, async-nats, each publish acknowledged).
#
#   bash bench/publish.sh [SECONDS]        (default: 10 s per load)
#
# wrk runs on CPU 0, the sidecar on CPU 1. The store lives in a fresh temp dir on the disk that
# holds $TMPDIR (default /tmp): run it where the real data_dir would be. Installs wrk if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-10}
LOADS=(1 64)

source bench/lib.sh
bench_needs wrk:wrk nginx:nginx redis-server:redis-server nats-server:nats-server
bench_build
cargo build --profile dist --locked -p outrigger-proxy --example jetstream_publish >&2
JETSTREAM_PUBLISH=$CARGO_TARGET_DIR/dist/examples/jetstream_publish

work=$(mktemp -d)
pid=
app=
redis=
cleanup() {
  [[ -n $pid ]] && kill "$pid" 2>/dev/null
  [[ -n $app ]] && kill "$app" 2>/dev/null
  # shellcheck disable=SC2086
  [[ -n $redis ]] && kill $redis 2>/dev/null
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
wait_ready() { for _ in $(seq 100); do curl -fs http://127.0.0.1:18191/readyz >/dev/null && return; sleep 0.1; done; }

# the disk's own flush: 4 KiB rewritten in place then fsync (data + inode), or fdatasync (data
# only, what a commit into an already allocated file needs); 200 samples each, median and p99 ms
python3 - "$work/fsync.probe" <<'PY' >"$work/fsync.txt"
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
block = b"x" * 4096
for i in range(16): os.pwrite(fd, block, i * 4096)
os.fsync(fd)
out = []
for flush in (os.fsync, os.fdatasync):
    times = []
    for i in range(200):
        os.pwrite(fd, block, (i % 16) * 4096)
        t = time.perf_counter(); flush(fd); times.append((time.perf_counter() - t) * 1000)
    times.sort()
    out += [f"{times[100]:.3f}", f"{times[197]:.3f}"]
print(" ".join(out))
PY
read -r fsync_median fsync_p99 fdatasync_median fdatasync_p99 <"$work/fsync.txt"

cat >"$work/outrigger.yaml" <<YAML
outbound: { listen: 127.0.0.1:18190 }
admin: { listen: 127.0.0.1:18191 }
messaging: { data_dir: $work/data }
telemetry: { log: { level: warn } }
YAML
taskset -c 1 "$OUTRIGGER" run --config "$work/outrigger.yaml" >"$work/outrigger.log" 2>&1 &
pid=$!
wait_ready

publish_lua "$work/publish.lua"

# a short warm-up creates the store file (it opens at the first publish)
taskset -c 0 wrk -t1 -c1 -d1s -s "$work/publish.lua" http://127.0.0.1:18190/v1/publish/bench >/dev/null
echo "| publishers | durable publishes/s | p50 ms | p99 ms | non-202 or errors |"
echo "|---|---|---|---|---|"
for c in "${LOADS[@]}"; do
  threads=$((c < 2 ? 1 : 2))
  line=$(taskset -c 0 wrk -t"$threads" -c"$c" -d"${SECONDS_PER_RUN}s" -s "$work/publish.lua" \
    http://127.0.0.1:18190/v1/publish/bench | grep '^RESULT')
  read -r _ rps p50 p99 bad <<<"$line"
  echo "| $c | $rps | $p50 | $p99 | $bad |"
done
# the front door alone on the same CPU: the same request with its JSON cut short, answered 400
# before the store (HTTP parsing, routing, the body read, the answer): what no store can beat
cat >"$work/malformed.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Host"] = "localhost"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"order":42,"customer":"c-7","items":[{"sku":"A-1","qty":2}]'
LUA
front=$(taskset -c 0 wrk -t2 -c64 -d"${SECONDS_PER_RUN}s" -s "$work/malformed.lua" \
  http://127.0.0.1:18190/v1/publish/bench | awk '/^Requests\/sec/{printf "%.0f", $2}')
echo
echo "the front door alone, 64 publishers, a malformed body answered 400 before the store: $front requests/s"
echo "disk, 4 KiB rewrite + fsync: median ${fsync_median} ms, p99 ${fsync_p99} ms; + fdatasync: median ${fdatasync_median} ms, p99 ${fdatasync_p99} ms (200 samples each)"
echo "messages pending in the store: $(outbox_pending)"

# delivery: the same store, now with a subscription, to an nginx worker on CPU 1 beside it
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
cat >"$work/app.conf" <<CONF
worker_processes 1; daemon off; pid $work/app.pid; error_log stderr error;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:18192; location / { return 200 "ok"; } } }
CONF
taskset -c 1 nginx -c "$work/app.conf" -e stderr &
app=$!
cat >"$work/outrigger.yaml" <<YAML
outbound: { listen: 127.0.0.1:18190 }
admin: { listen: 127.0.0.1:18191 }
service: { name: bench, app: { url: "http://127.0.0.1:18192" } }
messaging:
  data_dir: $work/data
  subscriptions: [ { queue: bench, path: /events, concurrency: 64 } ]
telemetry: { log: { level: warn } }
YAML
taskset -c 1 "$OUTRIGGER" run --config "$work/outrigger.yaml" >>"$work/outrigger.log" 2>&1 &
pid=$!
wait_ready
start_pending=$(outbox_pending); start=$(date +%s.%N)
sleep "$SECONDS_PER_RUN"
end_pending=$(outbox_pending); end=$(date +%s.%N)
python3 -c "
delivered = $start_pending - $end_pending
print(f'delivery to a local app, concurrency 64: {delivered / ($end - $start):.0f} messages/s acknowledged ({delivered:.0f} in {$end - $start:.1f} s; {$end_pending:.0f} still pending)')
"

# --- the same through Redis: one server, then a three-node cluster ---
metric() { curl -s http://127.0.0.1:18191/metrics | awk -v m="$1" '$1 == m {print $2}'; }
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
redis_pids=()
# redis_node PORT [ARGS…]: a redis-server on CPU 1 with appendonly and appendfsync always
redis_node() {
  local port=$1; shift
  mkdir -p "$work/redis-$port"
  taskset -c 1 redis-server --port "$port" --bind 127.0.0.1 --dir "$work/redis-$port" --appendonly yes \
    --appendfsync always --save "" --daemonize no "$@" >"$work/redis-$port.log" 2>&1 &
  redis_pids+=($!)
  redis=${redis_pids[*]}
  for _ in $(seq 100); do redis-cli -p "$port" PING >/dev/null 2>&1 && break; sleep 0.1; done
}

# through LABEL BROKER_URL COUNT: publishes with the broker at 64 publishers, the relay's
# catch-up, and delivery through the broker's consumer group to the local app; COUNT prints how
# many messages the broker holds for queue `bench`
through() {
  local label=$1 url=$2 count=$3 line rps p50 p99 bad catch_up start end streamed first last
  rm -rf "$work/data-redis"
  cat >"$work/outrigger.yaml" <<YAML
outbound: { listen: 127.0.0.1:18190 }
admin: { listen: 127.0.0.1:18191 }
service: { name: bench }
messaging: { broker: "$url", data_dir: $work/data-redis }
telemetry: { log: { level: warn } }
YAML
  taskset -c 1 "$OUTRIGGER" run --config "$work/outrigger.yaml" >>"$work/outrigger.log" 2>&1 &
  pid=$!
  wait_ready
  taskset -c 0 wrk -t1 -c1 -d1s -s "$work/publish.lua" http://127.0.0.1:18190/v1/publish/bench >/dev/null
  line=$(taskset -c 0 wrk -t2 -c64 -d"${SECONDS_PER_RUN}s" -s "$work/publish.lua" \
    http://127.0.0.1:18190/v1/publish/bench | grep '^RESULT')
  read -r _ rps p50 p99 bad <<<"$line"
  catch_up=$(outbox_catch_up)
  streamed=$($count)
  echo "publishes with broker $label, 64 publishers: $rps/s durable in the outbox (p50 $p50 ms, p99 $p99 ms, errors $bad); relay caught up $catch_up s after the load; $streamed messages in the stream"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  cat >"$work/outrigger.yaml" <<YAML
outbound: { listen: 127.0.0.1:18190 }
admin: { listen: 127.0.0.1:18191 }
service: { name: bench, app: { url: "http://127.0.0.1:18192" } }
messaging:
  broker: "$url"
  data_dir: $work/data-redis
  subscriptions: [ { queue: bench, path: /events, concurrency: 64 } ]
telemetry: { log: { level: warn } }
YAML
  taskset -c 1 "$OUTRIGGER" run --config "$work/outrigger.yaml" >>"$work/outrigger.log" 2>&1 &
  pid=$!
  wait_ready
  local acked='outrigger_messages_delivered_total{outcome="acked",queue="bench"}'
  first=$(metric "$acked"); start=$(date +%s.%N)
  sleep "$SECONDS_PER_RUN"
  last=$(metric "$acked"); end=$(date +%s.%N)
  python3 -c "
n = ${last:-0} - ${first:-0}
print(f'delivery through $label to a local app, concurrency 64: {n / ($end - $start):.0f} messages/s acknowledged ({n:.0f} in {$end - $start:.1f} s)')
"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
}

redis_node 18193
echo
echo "Redis (appendonly yes, appendfsync always), the broker's own limit, redis-benchmark XADD:"
for c in 1 64; do
  line=$(taskset -c 0 redis-benchmark -p 18193 -c "$c" -n $((c == 1 ? 20000 : 200000)) -q \
    XADD bench:raw '*' envelope '{"order":42,"customer":"c-7","items":[{"sku":"A-1","qty":2}]}' | tr '\r' '\n' | grep 'requests per second' | tail -1)
  echo "  $c client(s): $line"
done
redis-cli -p 18193 DEL bench:raw >/dev/null
redis_count() { redis-cli -p 18193 XLEN 'outrigger:{bench}'; }
through redis "redis://127.0.0.1:18193" redis_count

# a three-node cluster, all on CPU 1 beside the sidecar
for port in 18196 18197 18198; do
  redis_node "$port" --cluster-enabled yes --cluster-port $((port + 100)) --cluster-config-file nodes.conf
done
redis-cli --cluster create 127.0.0.1:18196 127.0.0.1:18197 127.0.0.1:18198 --cluster-replicas 0 \
  --cluster-yes >/dev/null
cluster_ok() {
  local port
  for port in 18196 18197 18198; do
    redis-cli -p "$port" CLUSTER INFO | grep -q cluster_state:ok || return 1
  done
}
for _ in $(seq 100); do cluster_ok && break; sleep 0.1; done
echo
# the node that holds the queue's slot, where the stream's writes go
for owner in 18196 18197 18198; do
  redis-cli -p "$owner" XADD '{bench}:raw' '*' probe 1 | grep -q MOVED || break
done
line=$(taskset -c 0 redis-benchmark -p "$owner" -c 64 -n 200000 -q \
  XADD '{bench}:raw' '*' envelope '{"order":42,"customer":"c-7","items":[{"sku":"A-1","qty":2}]}' | tr '\r' '\n' | grep 'requests per second' | tail -1)
echo "Redis Cluster (3 nodes, appendfsync always), redis-benchmark XADD on the node of the stream's slot, 64 clients: $line"
cluster_count() { redis-cli -c -p 18196 XLEN 'outrigger:{bench}'; }
through "redis+cluster" "redis+cluster://127.0.0.1:18196,127.0.0.1:18197,127.0.0.1:18198" cluster_count
# shellcheck disable=SC2086
kill $redis 2>/dev/null; wait $redis 2>/dev/null || true; redis=

# NATS JetStream on CPU 1 (file storage; 2.9 writes before acknowledging, fsyncs every 60 s)
mkdir -p "$work/nats"
cat >"$work/nats/nats.conf" <<CONF
host: 127.0.0.1
port: 18199
http: 127.0.0.1:18200
max_payload: 8MB
jetstream { store_dir: "$work/nats/store", max_memory_store: 64MB, max_file_store: 8GB }
CONF
taskset -c 1 nats-server -c "$work/nats/nats.conf" >"$work/nats/nats.log" 2>&1 &
redis=$!
for _ in $(seq 100); do curl -fs 'http://127.0.0.1:18200/healthz?js-enabled-only=true' >/dev/null && break; sleep 0.1; done
echo
echo "NATS JetStream $(nats-server --version | awk '{print $NF}'), the broker's own limit, a JetStream publish loop (async-nats, one connection):"
for c in 1 64; do
  echo "  $c client(s): $(taskset -c 0 "$JETSTREAM_PUBLISH" nats://127.0.0.1:18199 bench.raw "$c" "$SECONDS_PER_RUN")"
done
nats_count() {
  curl -s 'http://127.0.0.1:18200/jsz?streams=true' | python3 -c '
import json, sys
streams = json.load(sys.stdin)["account_details"][0]["stream_detail"]
print(sum(s["state"]["messages"] for s in streams if s["name"] == "OUTRIGGER-Q-bench"))'
}
through nats "nats://127.0.0.1:18199" nats_count
