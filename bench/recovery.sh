#!/usr/bin/env bash
# Recovery and disk use of the embedded broker with a large backlog:
#
#   bash bench/recovery.sh [MESSAGES]      (default: 1000000)
#
# 1. Publishes MESSAGES (64 publishers, wrk on CPU 0, the sidecar on CPU 1) and notes the data
#    directory's size: the peak.
# 2. kill -9 at once (the last second of records is in the log only, not yet checkpointed), then
#    times a start until `GET /v1/queues` answers with every message: the recovery.
# 3. Delivers them all to a local app (an nginx worker answering 200, concurrency 64), waits for
#    a checkpoint, and notes the data directory's size again: what is left of the peak.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${1:-1000000}

source bench/lib.sh
bench_needs wrk:wrk nginx:nginx
bench_build
bench_workdir

metric() { curl -s http://127.0.0.1:18191/metrics | awk -v m="$1" '$1 == m {print $2}'; }
ready() { for _ in $(seq 300); do curl -fs http://127.0.0.1:18191/readyz >/dev/null && return; sleep 0.1; done; return 1; }
size() { du -sb "$work/data" | cut -f1; }
mib() { python3 -c "print(f'{$1 / 1048576:.1f} MiB')"; }

cat >"$work/outrigger.yaml" <<YAML
outbound: { listen: 127.0.0.1:18190 }
admin: { listen: 127.0.0.1:18191 }
service: { name: bench, app: { url: "http://127.0.0.1:18192" } }
messaging: { data_dir: $work/data }
telemetry: { log: { level: info } }
YAML
taskset -c 1 "$OUTRIGGER" run --config "$work/outrigger.yaml" >"$work/outrigger.log" 2>&1 &
pid=$!
pids+=("$pid")
ready

cat >"$work/publish.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Host"] = "localhost"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"order":42,"customer":"c-7","items":[{"sku":"A-1","qty":2}]}'
LUA
# wrk publishes until the store holds MESSAGES, then is stopped
start=$(date +%s.%N)
taskset -c 0 wrk -t2 -c64 -d600s -s "$work/publish.lua" http://127.0.0.1:18190/v1/publish/bench >"$work/wrk.txt" &
load=$!
pids+=("$load")
until (( $(metric outrigger_outbox_pending) >= MESSAGES )); do sleep 0.2; done
kill "$load"; wait "$load" 2>/dev/null || true
end=$(date +%s.%N)
rss=$(awk '/VmHWM/ {print $2}' /proc/"$pid"/status)
published=$(metric outrigger_outbox_pending)
peak=$(size)
echo "published: $published messages in $(python3 -c "print(f'{$end - $start:.1f}')") s; data_dir $(mib "$peak") at the peak, $(mib "$(du -sb "$work/data/wal" | cut -f1)") of it the log; the sidecar's peak RSS $((rss / 1024)) MiB"

# kill -9 right after the last 202: the records since the last checkpoint are in the log only
kill -9 "$pid"; wait "$pid" 2>/dev/null || true
t0=$(date +%s.%N)
taskset -c 1 "$OUTRIGGER" run --config "$work/outrigger.yaml" >>"$work/outrigger.log" 2>&1 &
pid=$!
pids+=("$pid")
until [[ "$(curl -fs http://127.0.0.1:18191/v1/queues 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["queues"][0]["messages"])' 2>/dev/null)" == "$published" ]]; do
  sleep 0.01
done
t1=$(date +%s.%N)
echo "after kill -9: $published messages back in $(python3 -c "print(f'{$t1 - $t0:.2f}')") s (start to GET /v1/queues counting them all)"
grep -o 'applied again.*' "$work/outrigger.log" | tail -1 | sed 's/\x1b\[[0-9;]*m//g' || true

# deliver them all, then let a checkpoint let go of the log
kill "$pid"; wait "$pid" 2>/dev/null || true
nginx_ok 127.0.0.1:18192 "$work/app.conf"
taskset -c 1 nginx -c "$work/app.conf" -e stderr &
pids+=("$!")
sed -i "s|messaging: { data_dir: $work/data }|messaging:\n  data_dir: $work/data\n  subscriptions: [ { queue: bench, path: /events, concurrency: 64 } ]|" "$work/outrigger.yaml"
start=$(date +%s.%N)
taskset -c 1 "$OUTRIGGER" run --config "$work/outrigger.yaml" >>"$work/outrigger.log" 2>&1 &
pid=$!
pids+=("$pid")
ready
until [[ "$(metric outrigger_outbox_pending)" == "0" ]]; do sleep 0.2; done
end=$(date +%s.%N)
sleep 2.5
after=$(size)
echo "delivered: $published in $(python3 -c "print(f'{$end - $start:.1f} s, {$published / ($end - $start):.0f}/s')")"
echo "data_dir after every message is acknowledged: $(mib "$after"), $(python3 -c "print(f'{100 * $after / $peak:.1f}')")% of the peak"
ls -la "$work/data" "$work/data/wal"
