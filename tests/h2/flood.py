"""HTTP/2 floods against edgeshard, one kind per run: frames that ask the server for work and
carry no request. Sends up to N frames of KIND on one TLS connection (raw frame headers after a
normal h2 start, so nothing in the client library smooths them out), reading what comes back,
until the server sends GOAWAY or closes. Prints "sent=... goaway=<code or None> acks=..."
(acks: PING and SETTINGS ACKs, that of the client's own first SETTINGS included).
Usage: python3 flood.py HOST PORT AUTHORITY KIND N. KIND: ping ping_ack settings window_update
priority empty_data continuation unknown malformed. Driven by tests/http2.rs."""
import socket
import struct
import sys

import h2.config
import h2.connection
import hpack

from h2common import tls_h2

host, port, authority, kind, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
s = tls_h2(host, port)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
s.sendall(c.data_to_send())


def frame(ftype, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


# a stream for the kinds that need one: a POST whose body never comes
if kind in ("empty_data", "continuation"):
    if kind == "empty_data":
        c.send_headers(1, [(":method", "POST"), (":path", "/upload"), (":authority", authority), (":scheme", "https")])
        s.sendall(c.data_to_send())
    else:
        # HEADERS without END_HEADERS: the block then goes on in CONTINUATION frames forever
        s.sendall(frame(1, 0, 1, b"\x82"))

enc = hpack.Encoder()
bad = [(":method", "GET"), (":scheme", "https"), (":path", "/m"), (":authority", authority), ("connection", "x")]

one = {
    "ping": lambda i: frame(6, 0, 0, struct.pack(">Q", i)),
    "ping_ack": lambda i: frame(6, 1, 0, struct.pack(">Q", i)),
    "unknown": lambda i: frame(0x42, 0, 0),
    # a malformed request on a new stream each time (connection-specific field)
    "malformed": lambda i: frame(1, 0x5, 2 * i + 1, enc.encode(bad)),
    "settings": lambda i: frame(4, 0, 0),
    "window_update": lambda i: frame(8, 0, 0, struct.pack(">I", 1)),
    "priority": lambda i: frame(2, 0, 3, struct.pack(">IB", 0, 15)),
    "empty_data": lambda i: frame(0, 0, 1),
    "continuation": lambda i: frame(9, 0, 1, b"\x00\x01x\x01y"),
}[kind]

goaway = None
acks = 0
closed = False
s.settimeout(0.002)


inbox = b""


def pump():
    """Read once and walk the frames that came (read raw: the client library would refuse
    resets of streams it never opened); False when nothing came in time."""
    global goaway, acks, closed, inbox
    try:
        data = s.recv(65536)
    except socket.timeout:
        return False
    except OSError:
        closed = True
        return True
    if not data:
        closed = True
        return True
    inbox += data
    while len(inbox) >= 9:
        length = int.from_bytes(inbox[:3], "big")
        if len(inbox) < 9 + length:
            break
        ftype, flags, payload = inbox[3], inbox[4], inbox[9:9 + length]
        inbox = inbox[9 + length:]
        if ftype == 7:
            goaway = int.from_bytes(payload[4:8], "big")
        elif ftype in (4, 6) and flags & 1:
            acks += 1
        elif ftype == 4:
            # the server's SETTINGS, acknowledged
            try:
                s.sendall(frame(4, 1, 0))
            except OSError:
                closed = True
    return True


sent = 0
batch = 10
while sent < n and goaway is None and not closed:
    try:
        s.sendall(b"".join(one(sent + k) for k in range(batch)))
    except OSError:
        closed = True
        break
    sent += batch
    pump()
s.settimeout(1)
# what is still on its way, until a second passes with nothing
while goaway is None and not closed and pump():
    pass
print(f"sent={sent} goaway={goaway} acks={acks}")
