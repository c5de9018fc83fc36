#!/usr/bin/env bash
# Two builds of outrigger side by side, both exporting every call's spans to the same
# collector (an nginx answering 200 to each export): calls per proxy CPU-second, with a
# sampled traceparent from wrk ("traced") and without one (Outrigger starts the traces).
# What docs/BENCHMARKS.md compares the OpenTelemetry exporter against the hand-written one with.
#
#   bash bench/export_ab.sh BEFORE_BINARY AFTER_BINARY [ROUNDS]
#
# wrk and the collector on CPU 0, both proxies and the upstream on CPU 1; 16 connections,
# 5 s per run, rounds interleaved. All traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=${1:?the first binary}
AFTER=${2:?the second binary}
ROUNDS=${3:-3}

source bench/lib.sh
bench_needs wrk:wrk nginx:nginx
bench_workdir

UP=127.0.0.1:18180
nginx_ok "$UP" "$work/upstream.conf"
nginx_ok 127.0.0.1:18187 "$work/collector.conf"
config() { # name port admin
  cat >"$work/$1.yaml" <<CONF
admin: { listen: 127.0.0.1:$3 }
outbound: { listen: 127.0.0.1:$2 }
upstreams:
  bench:
    discovery: { static: ["$UP"] }
telemetry:
  log: { level: warn }
  tracing: { otlp_endpoint: "http://127.0.0.1:18187", sample_ratio: 1.0 }
CONF
}
config before 18183 18193
config after 18184 18194
taskset -c 1 nginx -c "$work/upstream.conf" >/dev/null 2>&1 & pids+=($!)
taskset -c 0 nginx -c "$work/collector.conf" >/dev/null 2>&1 & pids+=($!)
taskset -c 1 "$BEFORE" run --config "$work/before.yaml" >"$work/before.log" 2>&1 & pids+=($!)
B=$!
taskset -c 1 "$AFTER" run --config "$work/after.yaml" >"$work/after.log" 2>&1 & pids+=($!)
A=$!
for port in 18180 18183 18184 18187; do
  for _ in $(seq 100); do curl -fsS -o /dev/null -H 'Host: bench' "http://127.0.0.1:$port/" 2>/dev/null && break; sleep 0.1; done
done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TP='traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'
for round in $(seq "$ROUNDS"); do
  for who in before after; do
    port=18183 pid=$B
    if [[ $who == after ]]; then port=18184 pid=$A; fi
    for traced in yes no; do
      header=(-H 'Host: bench')
      if [[ $traced == yes ]]; then header+=(-H "$TP"); fi
      t0=$(ticks "$pid")
      out=$(taskset -c 0 wrk -t1 -c16 -d5s "${header[@]}" "http://127.0.0.1:$port/")
      t1=$(ticks "$pid")
      n=$(grep -o '[0-9]* requests in' <<<"$out" | grep -o '^[0-9]*')
      rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
      echo "round $round  $who  traceparent=$traced  req/s=$rps  calls per proxy CPU-s=$((n * $(getconf CLK_TCK) / (t1 - t0)))"
    done
  done
done
