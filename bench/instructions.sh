#!/usr/bin/env bash
# User-space instructions per request, counted by callgrind: the figure that does not drift
# with a shared machine's speed, for comparing two builds' own code (kernel time is not in it;
# the bench's CPU time per request is). Scenario A: plain keep-alive through one shard.
#
#   bench/instructions.sh                         # target/release/edgeshard
#   bench/instructions.sh /tmp/edgeshard-before   # another build, same load
#
# Installs valgrind when missing. Bounded: a fixed number of requests, then everything it
# started is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/edgeshard}
requests=${REQUESTS:-20000}
command -v valgrind >/dev/null || { echo "installing valgrind"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
[ -x target/release/edgeshard-bench ] || cargo build --release -q -p edgeshard-bench
tmp=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
op=$(free_port); pp=$(free_port)
cat >"$tmp/es.toml" <<EOF
[runtime]
shards = 1
[[virtual_service]]
listen = "127.0.0.1:$pp"
[[virtual_service.real_server]]
address = "127.0.0.1:$op"
EOF
target/release/edgeshard-bench origin --listen "127.0.0.1:$op" >"$tmp/origin.log" 2>&1 &
origin=$!
valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.out" "$bin" run --config "$tmp/es.toml" >"$tmp/proxy.log" 2>&1 &
proxy=$!
trap 'kill $origin $proxy 2>/dev/null || true; rm -rf "$tmp"' EXIT
for _ in $(seq 1 100); do
  target/release/edgeshard-bench load --url "http://127.0.0.1:$pp/" --connections 1 --requests 1 --quiet >/dev/null 2>&1 && break
  sleep 0.3
done
load() { target/release/edgeshard-bench load --url "http://127.0.0.1:$pp/" --connections 8 --requests "$1" --quiet --json "$tmp/load.json" >/dev/null; }
load 2000 # start-up and warm-up, counted in the total but not in the difference below
base=$(callgrind_control --dump=warm "$proxy" >/dev/null 2>&1; sleep 1; ls "$tmp"/cg.out.* 2>/dev/null | head -1)
load "$requests"
kill -INT "$proxy"; wait "$proxy" || true
total=$(grep -m1 '^summary:' "$tmp/cg.out" | awk '{print $2}')
warm=$( [ -n "$base" ] && grep -m1 '^summary:' "$base" | awk '{print $2}' || echo 0)
echo "binary: $bin"
echo "user-space instructions per request: $(( (total - warm) / requests )) (callgrind, $requests requests, 8 connections, scenario A)"
