#!/bin/sh
# Announce the VIP over BGP (BIRD's "vip" protocol) only while this appliance is healthy.
# Run every second, e.g. from a systemd service: while true; do vip-announce.sh; sleep 1; done
if /usr/local/bin/edgeshard ctl health --admin http://127.0.0.1:9900 >/dev/null 2>&1; then
  birdc enable vip >/dev/null
else
  birdc disable vip >/dev/null
fi
