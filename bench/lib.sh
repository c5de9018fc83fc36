# Shared by the bench scripts, sourced from the repository root.

# bench_needs CMD:PACKAGE ... — installs the Debian package of each command that is missing.
bench_needs() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  if ((${#missing[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  fi
}

# bench_build — builds the binary as the container image is (dist profile); sets OUTRIGGER.
bench_build() {
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/outrigger-target}
  cargo build --profile dist --locked -p outrigger-proxy --bin outrigger >&2
  OUTRIGGER=$CARGO_TARGET_DIR/dist/outrigger
}

# bench_workdir — a scratch directory in $work; on exit, every pid in $pids is killed and the
# directory removed.
bench_workdir() {
  work=$(mktemp -d)
  pids=()
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"' EXIT
}

# nginx_ok ADDR FILE — an nginx config of one worker answering 200 "ok" on ADDR, kept-alive.
nginx_ok() {
  cat >"$2" <<CONF
worker_processes 1; daemon off; pid $2.pid; error_log stderr error;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 10000000;
  server { listen $1; location / { return 200 "ok\n"; } } }
CONF
}

# nginx_proxy LISTEN UPSTREAM FILE [PROCESS] — an nginx config of one worker proxying LISTEN
# (e.g. `127.0.0.1:18181` or `127.0.0.1:18181 http2`) to UPSTREAM over kept-alive HTTP/1.1, no
# access log: the yardstick every data-plane benchmark measures against. PROCESS adds to the
# main context (`master_process off;` to run the worker itself, under valgrind).
nginx_proxy() {
  cat >"$3" <<CONF
worker_processes 1; daemon off; ${4:-} pid $3.pid; error_log stderr error;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 10000000;
  upstream up { server $2; keepalive 256; }
  server { listen $1;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
}

# full_yaml UPSTREAM OUT — Outrigger with every HTTP policy on, set so that none trips (the cost
# of the whole stack), admin on 18194 and outbound on 18184, forwarding to UPSTREAM.
full_yaml() {
  cat >"$2" <<CONF
admin: { listen: 127.0.0.1:18194 }
outbound: { listen: 127.0.0.1:18184 }
upstreams:
  bench:
    discovery: { static: ["$1"] }
    timeouts: { connect: 1s, request: 10s, per_try: 5s }
    retry: { max_attempts: 3, budget: { ratio: 0.2, min_per_second: 10 } }
    circuit_breaker: { failure_rate: 0.5, window: 10s, min_requests: 20, consecutive_failures: 5 }
    rate_limit: { requests_per_second: 1000000, burst: 100000 }
    concurrency_limit: 100000
telemetry: { log: { level: warn } }
CONF
}

# routes_yaml FULL OUT — FULL's config (ports +1) behind 20 routes of prefix, method and header
# rules, the last of which matches every request: the cost of choosing a route (issue 19).
routes_yaml() {
  {
    sed -e 's/18194/18195/' -e 's/18184/18185/' -e '/^telemetry/d' "$1"
    echo "    routes:"
    for i in $(seq 1 19); do
      case $((i % 3)) in
        0) echo "      - { name: r$i, match: { path_prefix: /v$i/orders } }" ;;
        1) echo "      - { name: r$i, match: { path_prefix: /api, methods: [POST, PUT] } }" ;;
        2) echo "      - { name: r$i, match: { headers: { x-tenant: t$i } } }" ;;
      esac
    done
    echo "      - { name: last, match: { path_prefix: / } }"
    echo "telemetry: { log: { level: warn } }"
  } >"$2"
}

# publish_lua FILE — a wrk script POSTing a small JSON order to /v1/publish/…, printing
# `RESULT <requests/s> <p50 ms> <p99 ms> <non-202 or errors>` at the end.
publish_lua() {
  cat >"$1" <<'LUA'
wrk.method = "POST"
wrk.headers["Host"] = "localhost"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"order":42,"customer":"c-7","items":[{"sku":"A-1","qty":2}]}'
done = function(summary, latency, requests)
  local bad = summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT %.0f %.2f %.2f %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, bad))
end
LUA
}

# outbox_pending — the outbox's pending messages of the sidecar whose admin port is 18191.
outbox_pending() { curl -s http://127.0.0.1:18191/metrics | awk '/^outrigger_outbox_pending /{print $2}'; }

# outbox_catch_up — waits until that outbox is empty (60 s at most); prints the seconds it took.
outbox_catch_up() {
  local start end
  start=$(date +%s.%N)
  for _ in $(seq 1200); do [[ $(outbox_pending) == 0 ]] && break; sleep 0.05; done
  end=$(date +%s.%N)
  python3 -c "print(f'{$end - $start:.1f}')"
}
