#!/usr/bin/env bash
# HTTP/2 from the app (h2c, prior knowledge) through the full policy stack to an HTTP/1 upstream
# (`protocol: http1`):
# h2load against Outrigger's outbound port, and against nginx proxying the same way, rounds
# interleaved; requests per proxy CPU-second is the figure to compare.
#
#   bash bench/h2.sh [ROUNDS] [SECONDS] [BEFORE_BINARY]
#
# BEFORE_BINARY, if given, is an older `outrigger` measured in the same run as "before" (build
# one with `git worktree add /tmp/old COMMIT` and `cargo build --profile dist` there).
# Method as bench/http.sh: h2load alone on CPU 0, the proxy and the upstream (an nginx worker
# answering 200 "ok") on CPU 1. Loads: 16 connections of 10 streams each, and 256 of one.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
bench_needs h2load:nghttp2-client nginx:nginx
bench_build
ROUNDS=${1:-3}
SECS=${2:-5}
BEFORE=${3:-}
bench_workdir

UP=127.0.0.1:18180
nginx_ok "$UP" "$work/upstream.conf"
nginx_proxy "127.0.0.1:18181 http2" "$UP" "$work/nginx.conf"
full_yaml "$UP" "$work/full.yaml"
# HTTP/2 in, HTTP/1 out, as nginx proxies (`auto` would speak HTTP/2 to the upstream too)
sed -i 's/^    discovery:/    protocol: http1\n    discovery:/' "$work/full.yaml"
sed -e 's/18194/18196/' -e 's/18184/18186/' "$work/full.yaml" >"$work/before.yaml"

start() { taskset -c 1 "$@" >"$work/$(basename "$1").$#.log" 2>&1 & pids+=($!); }
start nginx -c "$work/upstream.conf"
start nginx -c "$work/nginx.conf"
start "$OUTRIGGER" run --config "$work/full.yaml"
declare -A PORT=([nginx]=18181 [outrigger-full]=18184)
declare -A PIDS=([outrigger-full]="${pids[2]}")
CONTENDERS=(nginx outrigger-full)
if [[ -n $BEFORE ]]; then
  start "$BEFORE" run --config "$work/before.yaml"
  PORT[before]=18186
  PIDS[before]="${pids[3]}"
  CONTENDERS+=(before)
fi
for who in "${CONTENDERS[@]}"; do
  for _ in $(seq 100); do
    h2load -n1 -c1 -H ':authority: bench' "http://127.0.0.1:${PORT[$who]}/" 2>/dev/null | grep -q '1 succeeded' && break
    sleep 0.1
  done
done
PIDS[nginx]="$(pgrep -P "${pids[1]}" | tr '\n' ' ')"

ticks() { local t=0; for p in $1; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
results=$work/results.tsv
run() { # contender connections streams seconds -> one TSV row
  local who=$1 conns=$2 streams=$3 secs=$4 before after
  before=$(ticks "${PIDS[$who]}")
  taskset -c 0 h2load -t1 -c"$conns" -m"$streams" -D"$secs" -H ':authority: bench' \
    "http://127.0.0.1:${PORT[$who]}/" >"$work/h2load.out"
  after=$(ticks "${PIDS[$who]}")
  python3 - "$who" "$conns x $streams" "$((after - before))" "$(getconf CLK_TCK)" "$work/h2load.out" <<'PY' >>"$results"
import re, sys
who, load, ticks, hz = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = open(sys.argv[5]).read()
m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
if m is None or rps is None:
    sys.exit(f"h2load against {who} printed no result:\n{out}")
done, ok = int(m.group(1)), int(m.group(2))
mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out).group(1)
cpu_s = ticks / hz
print(f"{who}\t{load}\t{float(rps.group(1)):.0f}\t{mean}\t{ok / cpu_s if cpu_s else 0:.0f}\t{done - ok}")
PY
}

echo "warming up" >&2
for who in "${CONTENDERS[@]}"; do run "$who" 16 10 2; done
: >"$results"
for round in $(seq "$ROUNDS"); do
  for load in "16 10" "256 1"; do
    for who in "${CONTENDERS[@]}"; do
      echo "round $round/$ROUNDS: $who at $load" >&2
      # shellcheck disable=SC2086
      run "$who" $load "$SECS"
    done
  done
done

python3 - "$results" "$ROUNDS" "$SECS" <<'PY'
import statistics, sys
from collections import defaultdict
path, rounds, secs = sys.argv[1:]
rows = defaultdict(list)
for line in open(path):
    who, load, rps, mean, per_cpu, failed = line.rstrip("\n").split("\t")
    rows[(load, who)].append((float(rps), mean, float(per_cpu), int(failed)))
print(f"median of {rounds} rounds of {secs} s each; h2load on CPU 0, proxy + upstream on CPU 1\n")
print("| contender | connections x streams | req/s | mean latency | req per proxy CPU-s | per CPU-s spread | vs nginx | failed |")
print("|---|---|---|---|---|---|---|---|")
for (load, who), runs in rows.items():
    per = [r[2] for r in runs]
    nginx = statistics.median(r[2] for r in rows[(load, "nginx")])
    print(f"| {who} | {load} | {statistics.median(r[0] for r in runs):.0f} | {runs[len(runs) // 2][1]} "
          f"| {statistics.median(per):.0f} | {min(per):.0f}–{max(per):.0f} "
          f"| {statistics.median(per) / nginx:.2f} | {sum(r[3] for r in runs)} |")
PY
