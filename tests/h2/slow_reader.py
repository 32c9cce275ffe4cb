"""A slow HTTP/2 reader against edgeshard: announces a zero flow-control window, opens N
streams for a large response and never opens the window. Prints "headers=H resets=R" after
WAIT seconds or once every stream was reset, whichever is first, and stays connected until
then (the proxy's memory is measured meanwhile by tests/http2.rs).
Usage: python3 slow_reader.py HOST PORT AUTHORITY PATH N WAIT"""
import socket
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.settings

from h2common import get, tls_h2

host, port, authority, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
n, wait = int(sys.argv[5]), float(sys.argv[6])
s = tls_h2(host, port)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.local_settings = h2.settings.Settings(
    client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
)
c.initiate_connection()
for _ in range(n):
    sid = c.get_next_available_stream_id()
    c.send_headers(
        sid,
        get(authority, path),
        end_stream=True,
    )
s.sendall(c.data_to_send())
print("streams sent", flush=True)
headers = resets = 0
s.settimeout(0.2)
end = time.time() + wait
while time.time() < end and resets < n:
    try:
        data = s.recv(65536)
    except socket.timeout:
        continue
    if not data:
        break
    for ev in c.receive_data(data):
        if isinstance(ev, h2.events.ResponseReceived):
            headers += 1
        if isinstance(ev, h2.events.StreamReset):
            resets += 1
    out = c.data_to_send()
    if out:
        s.sendall(out)
print(f"headers={headers} resets={resets}", flush=True)
