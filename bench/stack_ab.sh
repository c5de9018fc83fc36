#!/usr/bin/env bash
# Two builds of outrigger side by side with every HTTP policy on (bench/lib.sh full_yaml, none
# tripping), in interleaved rounds: requests/s and requests per proxy CPU-second at 16
# connections. What docs/BENCHMARKS.md checks a change on the request path with, when one
# run of bench/http.sh is too noisy to tell.
#
#   bash bench/stack_ab.sh BEFORE_BINARY AFTER_BINARY [ROUNDS] [SECONDS]
#
# wrk on CPU 0; both proxies and the upstream (an nginx worker answering 200) on CPU 1. All
# traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=${1:?the first binary}
AFTER=${2:?the second binary}
ROUNDS=${3:-5}
SECONDS_PER_RUN=${4:-5}

source bench/lib.sh
bench_needs wrk:wrk nginx:nginx
bench_workdir

UP=127.0.0.1:18180
nginx_ok "$UP" "$work/upstream.conf"
full_yaml "$UP" "$work/before.yaml"
full_yaml "$UP" "$work/after.yaml"
sed -i 's/18194/18195/; s/18184/18185/' "$work/after.yaml"
taskset -c 1 nginx -c "$work/upstream.conf" >/dev/null 2>&1 & pids+=($!)
taskset -c 1 "$BEFORE" run --config "$work/before.yaml" >"$work/before.log" 2>&1 & pids+=($!)
B=$!
taskset -c 1 "$AFTER" run --config "$work/after.yaml" >"$work/after.log" 2>&1 & pids+=($!)
A=$!
for port in 18180 18184 18185; do
  for _ in $(seq 100); do curl -fsS -o /dev/null -H 'Host: bench' "http://127.0.0.1:$port/" 2>/dev/null && break; sleep 0.1; done
done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for who in before after; do # warm-up
  port=18184
  [[ $who == after ]] && port=18185
  taskset -c 0 wrk -t1 -c16 -d1s -H 'Host: bench' "http://127.0.0.1:$port/" >/dev/null
done
for round in $(seq "$ROUNDS"); do
  for who in before after; do
    port=18184 pid=$B
    if [[ $who == after ]]; then port=18185 pid=$A; fi
    t0=$(ticks "$pid")
    out=$(taskset -c 0 wrk -t1 -c16 -d"${SECONDS_PER_RUN}s" -H 'Host: bench' "http://127.0.0.1:$port/")
    t1=$(ticks "$pid")
    n=$(grep -o '[0-9]* requests in' <<<"$out" | grep -o '^[0-9]*')
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    echo "round $round  $who  req/s=$rps  requests per proxy CPU-s=$((n * $(getconf CLK_TCK) / (t1 - t0)))"
  done
done
