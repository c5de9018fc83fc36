#!/usr/bin/env bash
# Instructions per request, the full stack against the same stack behind 20 routes whose last
# one matches (issue 19's route cost), counted by callgrind: exact from run to run, and blind
# to what else the machine is doing, unlike the CPU time bench/http.sh reads.
#
#   bash bench/callgrind-routes.sh        (needs valgrind, nginx, wrk; builds the dist binary)
#
# Each contender runs under callgrind; after a 3 s warm-up the counters are zeroed, 10 s of
# load at 4 connections is counted, and the total is divided by the requests wrk made.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
bench_needs wrk:wrk nginx:nginx valgrind:valgrind
bench_build
OUT=$OUTRIGGER
W=$(mktemp -d)
nginx_ok 127.0.0.1:18180 $W/up.conf
nginx -c $W/up.conf & NG=$!
sleep 0.5
full_yaml 127.0.0.1:18180 "$W/full.yaml"
routes_yaml "$W/full.yaml" "$W/routes.yaml"
for cfg in full routes; do
  port=$(grep -o 'outbound: { listen: 127.0.0.1:[0-9]*' $W/$cfg.yaml | sed 's/.*://')
  valgrind --tool=callgrind --callgrind-out-file=$W/cg.$cfg "$OUT" run --config $W/$cfg.yaml > $W/$cfg.log 2>&1 &
  PID=$!
  for _ in $(seq 300); do curl -fsS -o /dev/null -H 'Host: bench' "http://127.0.0.1:$port/" 2>/dev/null && break; sleep 0.2; done
  wrk -t1 -c4 -d3s -H 'Host: bench' "http://127.0.0.1:$port/" > /dev/null   # warm-up
  callgrind_control -z $PID >/dev/null
  wrk -t1 -c4 -d10s -H 'Host: bench' "http://127.0.0.1:$port/" > $W/wrk.$cfg
  callgrind_control -d $PID >/dev/null
  kill $PID; wait $PID || true
  reqs=$(grep -o '[0-9]* requests in' $W/wrk.$cfg | awk '{print $1}')
  ir=$(callgrind_annotate $W/cg.$cfg.1 2>/dev/null | grep -m1 'PROGRAM TOTALS' | awk '{gsub(",","",$1); print $1}')
  echo "$cfg requests=$reqs Ir=$ir per_request=$((ir / reqs))"
done
kill $NG
rm -rf "$W"
