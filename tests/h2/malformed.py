"""Malformed HTTP/2 requests against edgeshard, each on a connection of its own, sent as the
client library is told not to check them. Prints one line per case: "CASE reset=<code>" when
its stream was reset, "CASE goaway=<code>" when the connection was, "CASE status=<code>" when
it was answered.
Usage: python3 malformed.py HOST PORT AUTHORITY. Driven by tests/http2.rs."""
import socket
import sys
import time

import h2.config
import h2.connection
import h2.events

from h2common import tls_h2

host, port, authority = sys.argv[1], int(sys.argv[2]), sys.argv[3]

base = [(":method", "GET"), (":scheme", "https"), (":authority", authority)]
cases = {
    "connection_header": base + [(":path", "/m/1"), ("connection", "keep-alive")],
    "transfer_encoding": base + [(":path", "/m/2"), ("transfer-encoding", "chunked")],
    "te_gzip": base + [(":path", "/m/3"), ("te", "gzip")],
    "uppercase_name": base + [(":path", "/m/4"), ("X-Upper", "1")],
    "no_path": base,
    "pseudo_after_regular": [(":method", "GET"), (":scheme", "https"), ("x-a", "1"), (":path", "/m/5"), (":authority", authority)],
    "unknown_pseudo": base + [(":path", "/m/6"), (":bogus", "1")],
    "host_differs": base + [(":path", "/m/7"), ("host", "other.example")],
    "smuggled_crlf": base + [(":path", "/m/8"), ("x-a", "1\r\nX-Injected: yes")],
    "ok": base + [(":path", "/m/ok")],
}


def one(headers):
    """The case on a connection of its own: what came back for its stream."""
    s = tls_h2(host, port)
    c = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
    )
    c.initiate_connection()
    c.send_headers(1, headers, end_stream=True)
    s.sendall(c.data_to_send())
    s.settimeout(0.5)
    end = time.time() + 10
    while time.time() < end:
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        if not data:
            return "closed"
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.StreamReset) and ev.stream_id == 1:
                return f"reset={int(ev.error_code)}"
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == 1:
                return "status=" + dict(ev.headers).get(b":status", b"?").decode()
            if isinstance(ev, h2.events.ConnectionTerminated):
                return f"goaway={int(ev.error_code)}"
        out = c.data_to_send()
        if out:
            s.sendall(out)
    return "none"


for name, headers in cases.items():
    print(name, one(headers), flush=True)
