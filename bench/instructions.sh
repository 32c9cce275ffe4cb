#!/usr/bin/env bash
# User-space instructions per request, counted by callgrind: the figure that does not drift
# with a shared machine's speed, for comparing two builds' own code (kernel time is not in it;
# the bench's CPU time per request is). Scenario A: plain keep-alive through one shard.
#
#   bench/instructions.sh                         # target/release/edgeshard
#   bench/instructions.sh /tmp/edgeshard-before   # another build, same load
#
# Two runs under callgrind, of 2,000 and of 2,000 + REQUESTS (default 20,000) requests: the
# difference over REQUESTS leaves start-up and shutdown out. Installs valgrind when missing.
# Bounded: fixed request counts, and everything it starts is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
# where cargo puts the binaries (CARGO_TARGET_DIR or .cargo/config included)
rel=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release
bin=${1:-$rel/edgeshard}
requests=${REQUESTS:-20000}
command -v valgrind >/dev/null || {
  echo "installing valgrind"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
}
[ -x $rel/edgeshard-bench ] || cargo build --release -q -p edgeshard-bench
tmp=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$tmp"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
op=$(free_port)
$rel/edgeshard-bench origin --listen "127.0.0.1:$op" >"$tmp/origin.log" 2>&1 &
pids+=($!)

# Instructions of one proxy run that serves $1 requests after one start-up probe.
count() {
  local pp
  pp=$(free_port)
  printf '[runtime]\nshards = 1\n[[virtual_service]]\nlisten = "127.0.0.1:%s"\n[[virtual_service.real_server]]\naddress = "127.0.0.1:%s"\n' \
    "$pp" "$op" >"$tmp/es.toml"
  valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.$1" "$bin" run --config "$tmp/es.toml" \
    >"$tmp/proxy.$1.log" 2>&1 &
  local proxy=$!
  pids+=("$proxy")
  local up=""
  for _ in $(seq 1 100); do
    if $rel/edgeshard-bench load --url "http://127.0.0.1:$pp/" --connections 1 \
      --requests 1 --quiet >/dev/null 2>&1; then up=1; break; fi
    sleep 0.3
  done
  [ -n "$up" ] || { echo "the proxy did not start under valgrind" >&2; exit 1; }
  $rel/edgeshard-bench load --url "http://127.0.0.1:$pp/" --connections 8 \
    --requests "$1" --quiet >/dev/null
  kill -INT "$proxy"
  wait "$proxy" || true
  grep -m1 '^summary:' "$tmp/cg.$1" | awk '{print $2}'
}

short=$(count 2000)
long=$(count $((2000 + requests)))
echo "binary: $bin"
echo "user-space instructions per request: $(((long - short) / requests)) (callgrind; scenario A, 8 connections, $requests requests)"
