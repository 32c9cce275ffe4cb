#!/usr/bin/env bash
# Host tuning for an edgeshard appliance. Prints every change it makes; safe to run twice
# (it only changes what differs). Run as root.
#
#   tuning/host.sh --shard-cores 2-7 [--irq-cores 0-1] [--dry-run]
#
# - locked memory for io_uring (limits.d), open files
# - listen and SYN backlogs, local port range, TIME_WAIT reuse for many connections
# - IRQ affinity: network interrupts on the IRQ cores, away from the shard cores
set -euo pipefail

shard_cores=""
irq_cores=""
dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --shard-cores) shard_cores="$2"; shift 2 ;;
    --irq-cores) irq_cores="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    *) echo "usage: $0 --shard-cores LIST [--irq-cores LIST] [--dry-run]" >&2; exit 2 ;;
  esac
done

say() { echo "tuning: $*"; }
run() { if [ "$dry" = 1 ]; then say "(dry run) $*"; else "$@"; fi; }

set_sysctl() {
  local key="$1" want="$2" have
  have=$(sysctl -n "$key" 2>/dev/null | tr -s '\t ' ' ') || { say "skip $key (not on this kernel)"; return; }
  if [ "$have" != "$want" ]; then
    say "sysctl $key: '$have' -> '$want'"
    run sysctl -q -w "$key=$want"
    if [ "$dry" = 0 ]; then
      mkdir -p /etc/sysctl.d
      grep -v "^$key *=" /etc/sysctl.d/90-edgeshard.conf 2>/dev/null > /tmp/90-edgeshard.conf || true
      echo "$key = $want" >> /tmp/90-edgeshard.conf
      mv /tmp/90-edgeshard.conf /etc/sysctl.d/90-edgeshard.conf
    fi
  fi
}

# Connections: deep accept queues, SYN backlog, a wide local port range for upstream
# connections, reuse of TIME_WAIT ports for outgoing connections.
set_sysctl net.core.somaxconn 65535
set_sysctl net.ipv4.tcp_max_syn_backlog 65535
set_sysctl net.core.netdev_max_backlog 16384
set_sysctl net.ipv4.ip_local_port_range "1024 65535"
set_sysctl net.ipv4.tcp_tw_reuse 1
set_sysctl net.ipv4.tcp_fin_timeout 15
set_sysctl fs.file-max 4194304
set_sysctl fs.nr_open 4194304

# Locked memory for io_uring rings and registered buffers; open files for connections.
limits=/etc/security/limits.d/90-edgeshard.conf
want_limits=$'*\tsoft\tmemlock\tunlimited\n*\thard\tmemlock\tunlimited\n*\tsoft\tnofile\t1048576\n*\thard\tnofile\t1048576'
if [ "$(cat "$limits" 2>/dev/null)" != "$want_limits" ]; then
  say "$limits: memlock unlimited, nofile 1048576 (new logins; the systemd unit sets its own)"
  [ "$dry" = 1 ] || printf '%s\n' "$want_limits" > "$limits"
fi

# IRQ affinity: every interrupt onto the IRQ cores (default: the cores without shards).
expand() { # "2-4,7" -> "2 3 4 7"
  local out=() part; IFS=',' read -ra parts <<< "$1"
  for part in "${parts[@]}"; do
    if [[ "$part" == *-* ]]; then out+=($(seq "${part%-*}" "${part#*-}")); else out+=("$part"); fi
  done
  echo "${out[@]}"
}
if [ -n "$shard_cores" ]; then
  if [ -z "$irq_cores" ]; then
    all=$(seq 0 $(( $(nproc --all) - 1 )))
    shards=" $(expand "$shard_cores") "
    irq_cores=$(for c in $all; do [[ "$shards" == *" $c "* ]] || echo -n "$c,"; done)
    irq_cores=${irq_cores%,}
  fi
  if [ -z "$irq_cores" ]; then
    say "every core runs a shard: IRQ affinity left alone"
  else
    if systemctl is-active --quiet irqbalance 2>/dev/null; then
      say "stopping irqbalance (it would move interrupts back onto shard cores)"
      run systemctl disable --now irqbalance
    fi
    for f in /proc/irq/*/smp_affinity_list; do
      have=$(cat "$f" 2>/dev/null) || continue
      if [ "$have" != "$irq_cores" ]; then
        if [ "$dry" = 1 ] || echo "$irq_cores" > "$f" 2>/dev/null; then
          say "$(dirname "$f" | xargs basename): IRQ affinity $have -> $irq_cores"
        fi
      fi
    done
  fi
fi
say "done"
