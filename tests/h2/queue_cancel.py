"""Streams cancelled while queued: GET /hang (kept), then N GETs of /q that wait in the
service's queue, cancelled after a moment; then waits WAIT seconds with the connection open.
Prints "cancelled". Usage: python3 queue_cancel.py HOST PORT AUTHORITY N WAIT."""
import socket
import sys
import time

import h2.config
import h2.connection
import h2.errors

from h2common import get, tls_h2

host, port, authority, n, wait = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
s = tls_h2(host, port)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
req = lambda p: get(authority, p)
c.send_headers(1, req("/hang"), end_stream=True)
s.sendall(c.data_to_send())
time.sleep(0.3)
queued = []
for _ in range(n):
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, req("/q"), end_stream=True)
    queued.append(sid)
s.sendall(c.data_to_send())
time.sleep(0.5)
for sid in queued:
    c.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
s.sendall(c.data_to_send())
print("cancelled", flush=True)
time.sleep(wait)
