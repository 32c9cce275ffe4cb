"""What the HTTP/2 test clients share: a TLS connection to the proxy that negotiated h2 (its
certificate is not checked: the proxy's HTTP/2 is under test, not the test CA), and a GET's
pseudo-headers."""
import socket
import ssl


def tls_h2(host, port, sock=None):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    s = ctx.wrap_socket(sock or socket.create_connection((host, port)), server_hostname="web.example")
    assert s.selected_alpn_protocol() == "h2", s.selected_alpn_protocol()
    return s


def get(authority, path, scheme="https"):
    return [(":method", "GET"), (":path", path), (":authority", authority), (":scheme", scheme)]
