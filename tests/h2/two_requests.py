"""One HTTP/2 connection, two requests apart: GET /first, then (after a line on stdin) GET
/second on the same connection. Prints "first=<status>" and then "second=<status, reset=code
or goaway=code>". Usage: python3 two_requests.py HOST PORT AUTHORITY. Driven by tests/http2.rs."""
import socket
import sys
import time

import h2.config
import h2.connection
import h2.events

from h2common import get, tls_h2

host, port, authority = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = tls_h2(host, port)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
s.sendall(c.data_to_send())
s.settimeout(10)
goaway = None


def ask(path):
    global goaway
    if goaway is not None:
        return f"goaway={goaway}"
    sid = c.get_next_available_stream_id()
    try:
        c.send_headers(sid, get(authority, path), end_stream=True)
        s.sendall(c.data_to_send())
    except Exception as e:
        return f"refused({e.__class__.__name__})" if goaway is None else f"goaway={goaway}"
    while True:
        try:
            data = s.recv(65536)
        except (socket.timeout, OSError):
            return "none" if goaway is None else f"goaway={goaway}"
        if not data:
            return "closed" if goaway is None else f"goaway={goaway}"
        result = None
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.ConnectionTerminated):
                goaway = int(ev.error_code)
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                result = dict(ev.headers)[b":status"].decode()
            if isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                result = f"reset={int(ev.error_code)}"
        out = c.data_to_send()
        if out:
            s.sendall(out)
        if result:
            return result


print("first=" + ask("/first"), flush=True)
sys.stdin.readline()
# what the server said meanwhile, read raw for up to 2 s: a GOAWAY means no second request
s.settimeout(0.2)
raw = b""
deadline = time.time() + 2
while goaway is None and time.time() < deadline:
    try:
        data = s.recv(65536)
    except socket.timeout:
        continue
    except OSError:
        break
    if not data:
        break
    raw += data
    while len(raw) >= 9:
        n = int.from_bytes(raw[:3], "big")
        if len(raw) < 9 + n:
            break
        if raw[3] == 7:
            goaway = int.from_bytes(raw[9 + 4:9 + 8], "big")
        raw = raw[9 + n:]
s.settimeout(10)
print("second=" + ask("/second"), flush=True)
