"""A client that stops reading its socket: opens wide flow-control windows, asks for PATH on
N streams, then reads nothing for WAIT seconds (the proxy's send buffer and ours fill).
Prints "sent". Usage: python3 stall.py HOST PORT AUTHORITY PATH N WAIT. Driven by tests/http2.rs."""
import socket
import sys
import time

import h2.config
import h2.connection
import h2.settings

from h2common import get, tls_h2

host, port, authority, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
n, wait = int(sys.argv[5]), float(sys.argv[6])
raw = socket.create_connection((host, port))
raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
s = tls_h2(host, port, raw)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.local_settings = h2.settings.Settings(
    client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1}
)
c.initiate_connection()
c.increment_flow_control_window(2**31 - 1 - 65535)
for _ in range(n):
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, get(authority, path), end_stream=True)
s.sendall(c.data_to_send())
print("sent", flush=True)
time.sleep(wait)
