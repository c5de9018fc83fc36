#!/usr/bin/env bash
# HTTP data-plane benchmark: Outrigger (bare, with every policy on, behind 20 routes, and
# exporting every call's spans over OTLP) against a direct connection, nginx and haproxy, in
# one run.
#
#   bash bench/http.sh [ROUNDS] [SECONDS]        (defaults: 3 rounds of 5 s per contender and load)
#
# One upstream (an nginx worker answering 200 "ok") serves every contender. wrk runs alone on
# CPU 0; the proxy under test and the upstream share CPU 1, as a sidecar shares its pod's CPU
# with its app. Contenders are interleaved round by round after a warm-up, at 16 and 256
# connections; the table gives medians over rounds. CPU per request comes from the proxy
# processes' own utime+stime; peak RSS from VmHWM. Installs wrk, nginx, haproxy when missing.
# All traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECONDS_PER_RUN=${2:-5}
LOADS=(16 256)

source bench/lib.sh
bench_needs wrk:wrk nginx:nginx haproxy:haproxy
bench_build
bench_workdir

UP=127.0.0.1:18180
nginx_ok "$UP" "$work/upstream.conf"
nginx_proxy 127.0.0.1:18181 "$UP" "$work/nginx.conf"
cat >"$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  bind 127.0.0.1:18182
  default_backend b
backend b
  server s1 $UP
CONF
cat >"$work/outrigger.yaml" <<CONF
admin: { listen: 127.0.0.1:18193 }
outbound: { listen: 127.0.0.1:18183 }
upstreams:
  bench:
    discovery: { static: ["$UP"] }
telemetry: { log: { level: warn } }
CONF
# the bare config exporting every call's spans (the app sends a sampled `traceparent`) to a
# collector: an nginx answering 200 to each export, on wrk's CPU so it takes none of the proxy's
sed -e 's/18193/18196/; s/18183/18186/' \
  -e 's|^telemetry: .*|telemetry: { log: { level: warn }, tracing: { otlp_endpoint: "http://127.0.0.1:18187", sample_ratio: 1.0 } }|' \
  "$work/outrigger.yaml" >"$work/outrigger-traced.yaml"
nginx_ok 127.0.0.1:18187 "$work/collector.conf"
TRACEPARENT='traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'
# every policy on, set so that none trips: the cost of the whole stack
full_yaml "$UP" "$work/outrigger-full.yaml"

# the full stack behind 20 routes (prefix, method and header rules), the last one matching
# every request: the cost of choosing a route, which has no sections of its own
routes_yaml "$work/outrigger-full.yaml" "$work/outrigger-routes.yaml"

start() { taskset -c 1 "$@" >"$work/$(basename "$1").log" 2>&1 & pids+=($!); }
start nginx -c "$work/upstream.conf"
start nginx -c "$work/nginx.conf"
start haproxy -f "$work/haproxy.cfg"
start "$OUTRIGGER" run --config "$work/outrigger.yaml"
start "$OUTRIGGER" run --config "$work/outrigger-full.yaml"
start "$OUTRIGGER" run --config "$work/outrigger-routes.yaml"
start "$OUTRIGGER" run --config "$work/outrigger-traced.yaml"
taskset -c 0 nginx -c "$work/collector.conf" >"$work/collector.log" 2>&1 & pids+=($!)
for port in 18180 18181 18182 18183 18184 18185 18186 18187; do
  for _ in $(seq 100); do curl -fsS -o /dev/null -H 'Host: bench' "http://127.0.0.1:$port/" 2>/dev/null && break; sleep 0.1; done
done

# contender -> "port pid-of-the-process-doing-the-work"
declare -A PORT=([direct]=18180 [nginx]=18181 [haproxy]=18182 [outrigger]=18183 [outrigger-full]=18184 [outrigger-routes]=18185 [outrigger-traced]=18186)
declare -A PIDS=(
  [direct]=""
  [nginx]="$(pgrep -P "${pids[1]}" | tr '\n' ' ')"
  [haproxy]="${pids[2]} $(pgrep -P "${pids[2]}" | tr '\n' ' ')"
  [outrigger]="${pids[3]}"
  [outrigger-full]="${pids[4]}"
  [outrigger-routes]="${pids[5]}"
  [outrigger-traced]="${pids[6]}"
)
# headers only one contender's requests carry
declare -A EXTRA=([outrigger-traced]="$TRACEPARENT")
ticks() { local t=0; for p in $1; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
hwm() { local m=0; for p in $1; do m=$((m + $(awk '/VmHWM/ {print $2}' "/proc/$p/status"))); done; echo "$m"; }

results=$work/results.tsv
run() { # contender connections seconds -> one TSV row
  local who=$1 conns=$2 secs=$3 before after out
  before=$(ticks "${PIDS[$who]}")
  taskset -c 0 wrk -t1 -c"$conns" -d"${secs}s" --latency -H 'Host: bench' ${EXTRA[$who]:+-H "${EXTRA[$who]}"} \
    "http://127.0.0.1:${PORT[$who]}/" >"$work/wrk.out"
  after=$(ticks "${PIDS[$who]}")
  python3 - "$who" "$conns" "$((after - before))" "$(getconf CLK_TCK)" "$work/wrk.out" <<'PY' >>"$results"
import re, sys
who, conns, ticks, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = open(sys.argv[5]).read()
if "Requests/sec" not in out:
    sys.exit(f"wrk against {who} printed no result:\n{out}")
def dur(s):
    m = re.match(r"([\d.]+)(us|ms|s)", s)
    if m is None:
        sys.exit(f"cannot read a latency of {s!r} in:\n{out}")
    n, u = m.groups()
    return float(n) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
total = int(re.search(r"(\d+) requests in", out).group(1))
p50 = dur(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))
p99 = dur(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))
errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
errors += int(non2xx.group(1)) if non2xx else 0
cpu_s = ticks / hz
per_cpu_s = total / cpu_s if cpu_s else 0
print(f"{who}\t{conns}\t{rps:.0f}\t{p50:.3f}\t{p99:.3f}\t{per_cpu_s:.0f}\t{errors}")
PY
}

echo "warming up" >&2
CONTENDERS=(direct nginx haproxy outrigger outrigger-full outrigger-routes outrigger-traced)
for who in "${CONTENDERS[@]}"; do run "$who" 16 2; done
: >"$results"
for round in $(seq "$ROUNDS"); do
  for conns in "${LOADS[@]}"; do
    for who in "${CONTENDERS[@]}"; do
      echo "round $round/$ROUNDS: $who at $conns connections" >&2
      run "$who" "$conns" "$SECONDS_PER_RUN"
    done
  done
done

rss=()
for who in "${CONTENDERS[@]:1}"; do rss+=("$who=$(hwm "${PIDS[$who]}")"); done
python3 - "$results" "$ROUNDS" "$SECONDS_PER_RUN" "${CONTENDERS[*]}" "${rss[@]}" <<'PY'
import statistics, sys
from collections import defaultdict
path, rounds, secs, contenders, *peaks = sys.argv[1:]
contenders = contenders.split()
rss = {"direct": "-", **dict(p.split("=") for p in peaks)}
rows = defaultdict(list)
for line in open(path):
    who, conns, rps, p50, p99, per_cpu, errors = line.split("\t")
    rows[(who, int(conns))].append((float(rps), float(p50), float(p99), float(per_cpu), int(errors)))
med = lambda xs: statistics.median(xs)
spread = lambda xs, fmt: f"{fmt.format(min(xs))}–{fmt.format(max(xs))}"
print(f"median of {rounds} rounds of {secs} s each (the spread columns give the lowest and highest round); "
      "wrk on CPU 0, proxy + upstream on CPU 1\n")
print("| contender | conns | req/s | req/s spread | vs direct | vs nginx | p50 ms | p99 ms | p99 spread | req per proxy CPU-s | per CPU-s spread | peak RSS KiB | errors |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for conns in sorted({c for _, c in rows}):
    base = {w: med([r[0] for r in rows[(w, conns)]]) for w in ("direct", "nginx")}
    for who in contenders:
        rs = rows[(who, conns)]
        rps = med([r[0] for r in rs])
        per_cpu = "-" if who == "direct" else f"{med([r[3] for r in rs]):.0f}"
        per_cpu_spread = "-" if who == "direct" else spread([r[3] for r in rs], "{:.0f}")
        print(f"| {who} | {conns} | {rps:.0f} | {spread([r[0] for r in rs], '{:.0f}')} | {rps / base['direct']:.2f} | "
              f"{rps / base['nginx']:.2f} | {med([r[1] for r in rs]):.3f} | {med([r[2] for r in rs]):.3f} | "
              f"{spread([r[2] for r in rs], '{:.3f}')} | {per_cpu} | {per_cpu_spread} | {rss[who]} | {sum(r[4] for r in rs)} |")
PY
echo
echo "spans of outrigger-traced (exported, dropped):"
curl -fsS http://127.0.0.1:18196/metrics | grep -E '^outrigger_spans_(exported|dropped)' || true
