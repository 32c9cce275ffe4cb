"""Streams cancelled while queued: GET /hang (kept), then N GETs of /q that wait in the
service's queue, cancelled after a moment; then waits WAIT seconds with the connection open.
Prints "cancelled". Usage: python3 queue_cancel.py HOST PORT AUTHORITY N WAIT."""
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.errors

host, port, authority, n, wait = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["h2"])
s = ctx.wrap_socket(socket.create_connection((host, port)), server_hostname="web.example")
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
req = lambda p: [(":method", "GET"), (":path", p), (":authority", authority), (":scheme", "https")]
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
