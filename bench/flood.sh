#!/usr/bin/env bash
# Memory under a connection flood: 10,000 client connections held open on the outbound
# listener, each after one proxied request (hyper keeps its buffers for a kept-alive
# connection), then 200 more past `max_connections`. Reports the sidecar's RSS before, at the
# peak and after the clients leave, how the extra connections were answered, and the latency of
# a request made while the flood is held.
#
#   bash bench/flood.sh [CONNECTIONS]      (default 10000, the default outbound.limits.max_connections)
#
# Needs nginx (the upstream) and python3; raises the open-file limit to the hard limit. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${1:-10000}
source bench/lib.sh
bench_needs nginx:nginx
ulimit -n "$(ulimit -Hn)" # the clients and the sidecar each hold CONNECTIONS + 200
bench_build
bench_workdir

UP=127.0.0.1:18280
nginx_ok "$UP" "$work/upstream.conf"
cat >"$work/outrigger.yaml" <<CONF
admin: { listen: 127.0.0.1:18293 }
outbound:
  listen: 127.0.0.1:18283
  limits: { max_connections: $CONNS, idle_timeout: 120s }
upstreams:
  flood:
    discovery: { static: ["$UP"] }
telemetry: { log: { level: warn } }
runtime: { workers: 1 }
CONF
nginx -c "$work/upstream.conf" & pids+=($!)
"$OUTRIGGER" run --config "$work/outrigger.yaml" & pids+=($!)
sidecar=$!
for _ in $(seq 100); do curl -fs http://127.0.0.1:18293/readyz >/dev/null && break; sleep 0.1; done

rss() { awk -v f="$1:" '$1 == f { print $2 }' "/proc/$sidecar/status"; }
echo "machine: $(nproc) CPUs, $(uname -r); $("$OUTRIGGER" --version)"
echo "before: VmRSS $(rss VmRSS) KiB"

python3 - "$CONNS" "$sidecar" <<'PY'
import asyncio, sys, time
conns, pid = int(sys.argv[1]), sys.argv[2]
REQ = b"GET / HTTP/1.1\r\nhost: flood\r\n\r\n"

def rss(field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

async def one_request():
    r, w = await asyncio.open_connection("127.0.0.1", 18283)
    w.write(REQ)
    await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    length = next((int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")), 0)
    if length:
        await r.readexactly(length)
    return r, w, status, head

async def main():
    held, started = [], time.monotonic()
    for batch in range(0, conns, 500):
        held += await asyncio.gather(*(one_request() for _ in range(min(500, conns - batch))))
    ok = sum(1 for h in held if h[2] == 200)
    print(f"held: {len(held)} connections, each after one request ({ok} answered 200) in {time.monotonic() - started:.1f} s")
    print(f"held: VmRSS {rss('VmRSS')} KiB, VmHWM {rss('VmHWM')} KiB, {rss('VmRSS') / len(held):.1f} KiB per connection")
    extra = await asyncio.gather(*(one_request() for _ in range(200)), return_exceptions=True)
    shed = [e for e in extra if not isinstance(e, Exception) and e[2] == 503 and b"overloaded" in e[3]]
    other = [e for e in extra if isinstance(e, Exception) or e[2] != 503]
    print(f"past the limit: {len(shed)} of 200 answered 503 overloaded, {len(other)} otherwise")
    for e in extra:
        if not isinstance(e, Exception):
            e[1].close()
    # a request on a held connection, while the flood is held
    r, w = held[0][0], held[0][1]
    t = time.monotonic()
    w.write(REQ)
    await w.drain()
    await r.readuntil(b"\r\n\r\n")
    await r.readexactly(3)
    print(f"a request on a held connection: {(time.monotonic() - t) * 1000:.2f} ms")
    for h in held:
        h[1].close()
    await asyncio.sleep(2)
    print(f"after the clients left: VmRSS {rss('VmRSS')} KiB, VmHWM {rss('VmHWM')} KiB")

asyncio.run(main())
PY
