"""Streams cancelled by the client free their places: opens N streams for PATH (an answer that
takes long), cancels each (RST_STREAM CANCEL) once all are sent, then asks for /after on the
same connection and prints "after=<status or reset=code> seconds=<time to its answer>".
Usage: python3 cancel.py HOST PORT AUTHORITY PATH N. Driven by tests/http2.rs."""
import socket
import sys
import time

import h2.config
import h2.connection
import h2.errors
import h2.events

from h2common import get, tls_h2

host, port, authority, path, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
s = tls_h2(host, port)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
req = lambda p: get(authority, p)
ids = []
for _ in range(n):
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, req(path), end_stream=True)
    ids.append(sid)
s.sendall(c.data_to_send())
time.sleep(0.5)  # they reach the real server
for sid in ids:
    c.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
s.sendall(c.data_to_send())
after = c.get_next_available_stream_id()
c.send_headers(after, req("/after"), end_stream=True)
s.sendall(c.data_to_send())
t0 = time.time()
s.settimeout(0.5)
result = "none"
while time.time() - t0 < 30 and result == "none":
    try:
        data = s.recv(65536)
    except socket.timeout:
        continue
    if not data:
        result = "closed"
        break
    for ev in c.receive_data(data):
        if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == after:
            result = dict(ev.headers)[b":status"].decode()
        if isinstance(ev, h2.events.StreamReset) and ev.stream_id == after:
            result = f"reset={int(ev.error_code)}"
    out = c.data_to_send()
    if out:
        s.sendall(out)
print(f"after={result} seconds={time.time() - t0:.2f}", flush=True)
