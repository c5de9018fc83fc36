#!/usr/bin/env bash
# Where a request's instructions go: the full policy stack under callgrind, 10 s of load at 4
# connections after a 3 s warm-up, then the instructions per request and the functions that
# take most of them, inclusive (a function with everything it calls) and exclusive.
#
#   bash bench/profile.sh [TOP] [CONNECTIONS] [full|bare|nginx]   (needs valgrind, nginx, wrk;
#                                                                  builds the dist binary)
#
# CONNECTIONS (4 unless given) shows how the cost grows with the breadth of the work: the same
# requests spread over 256 connections wake more tasks, arm more timers and batch fewer events.
# `bare` profiles the upstream without any policy: the codec, forwarding, metrics and the runtime.
# `nginx` profiles an nginx worker proxying the same way (upstream keep-alive, no access log),
# the yardstick of issue 20.
#
# Instructions are exact from run to run and blind to what else the machine does, so a change
# that saves 1% shows here when CPU time cannot see it. The callgrind file is kept as
# ./profile.callgrind for `callgrind_annotate` or kcachegrind.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
bench_needs wrk:wrk nginx:nginx valgrind:valgrind
bench_build
top=${1:-25}
conns=${2:-4}
stack=${3:-full}
bench_workdir
nginx_ok 127.0.0.1:18180 "$work/up.conf"
nginx -c "$work/up.conf" & pids+=($!)
full_yaml 127.0.0.1:18180 "$work/full.yaml"
if [[ $stack == bare ]]; then
  sed -i -E '/^    (timeouts|retry|circuit_breaker|rate_limit|concurrency_limit):/d' "$work/full.yaml"
fi
if [[ $stack == nginx ]]; then
  nginx_proxy 127.0.0.1:18184 127.0.0.1:18180 "$work/proxy.conf" "master_process off;"
  valgrind --tool=callgrind --callgrind-out-file="$work/cg" nginx -c "$work/proxy.conf" >"$work/log" 2>&1 &
else
  valgrind --tool=callgrind --callgrind-out-file="$work/cg" "$OUTRIGGER" run --config "$work/full.yaml" >"$work/log" 2>&1 &
fi
pid=$!; pids+=($pid)
for _ in $(seq 300); do curl -fsS -o /dev/null -H 'Host: bench' http://127.0.0.1:18184/ 2>/dev/null && break; sleep 0.2; done
wrk -t1 -c"$conns" -d3s -H 'Host: bench' http://127.0.0.1:18184/ >/dev/null
callgrind_control -z $pid >/dev/null
wrk -t1 -c"$conns" -d10s -H 'Host: bench' http://127.0.0.1:18184/ >"$work/wrk"
callgrind_control -d $pid >/dev/null
kill $pid; wait $pid 2>/dev/null || true
cp "$work/cg.1" profile.callgrind
reqs=$(grep -o '[0-9]* requests in' "$work/wrk" | awk '{print $1}')
ir=$(callgrind_annotate profile.callgrind 2>/dev/null | grep -m1 'PROGRAM TOTALS' | awk '{gsub(",","",$1); print $1}')
echo "requests=$reqs instructions=$ir per_request=$((ir / reqs))"
for mode in yes no; do
  echo; echo "== top $top, inclusive=$mode (instructions per request, share)"
  callgrind_annotate --inclusive=$mode --threshold=100 profile.callgrind 2>/dev/null \
    | grep -E '^ *[0-9,]+ \(' | awk -v t="$top" 'NR <= t' \
    | awk -v r="$reqs" '{n=$1; gsub(",","",n); $1=""; $2=""; printf "%8d  %s\n", n/r, substr($0,3)}' \
    | cut -c1-160
done
