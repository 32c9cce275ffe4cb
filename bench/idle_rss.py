#!/usr/bin/env python3
"""Scenario E (part): the proxy's resident memory per idle keep-alive client connection.

Starts a small keep-alive origin and `edgeshard run` (one shard), opens N client connections
that each complete one request and then stay idle, and reports the proxy's RSS growth per
connection (from /proc/PID/status): cold (the first N after start) and warm (a second N once
the first have closed). Bounded: it stops everything it started.

    python3 bench/idle_rss.py [--binary BIN] --connections 10000 [--tls]
"""
import argparse, http.server, json, os, resource, socket, socketserver, ssl, subprocess, sys, tempfile, threading, time

def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # the response goes out in two writes
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a):
        pass

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def main():
    ap = argparse.ArgumentParser()
    td = json.loads(subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"],
                                   capture_output=True, text=True, check=True).stdout)["target_directory"]
    ap.add_argument("--binary", default=os.path.join(td, "release", "edgeshard"))
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--tls", action="store_true", help="TLS to the proxy (a certificate made with openssl)")
    ap.add_argument("--engine", default=None, choices=["epoll", "io_uring"], help="runtime.io_engine (default: the proxy's)")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.connections + 1000), hard))
    origin = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    origin.daemon_threads = True
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    listen = free_port()
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    tls_cfg, ctx = "", None
    if args.tls:
        d = tempfile.mkdtemp()
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "2", "-subj", "/CN=bench.example", "-addext",
                        "subjectAltName=DNS:bench.example", "-keyout", f"{d}/k.pem", "-out", f"{d}/c.pem"],
                       check=True, capture_output=True)
        tls_cfg = f'[virtual_service.tls]\ncertificates = [{{ cert = "{d}/c.pem", key = "{d}/k.pem" }}]\n'
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    engine = f'io_engine = "{args.engine}"\n' if args.engine else ""
    cfg.write(f'[runtime]\ncores = [0]\n{engine}[[virtual_service]]\nlisten = "127.0.0.1:{listen}"\n{tls_cfg}'
              f'[[virtual_service.real_server]]\naddress = "127.0.0.1:{origin.server_address[1]}"\n')
    cfg.close()
    proxy = subprocess.Popen([args.binary, "run", "--config", cfg.name], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=1).close(); break
            except OSError:
                if time.time() > deadline: sys.exit("proxy did not start")
                time.sleep(0.05)
        time.sleep(0.5)
        req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"

        def open_idle(n):
            conns = []
            for i in range(n):
                s = socket.create_connection(("127.0.0.1", listen), timeout=10)
                if ctx:
                    s = ctx.wrap_socket(s, server_hostname="bench.example")
                s.sendall(req)
                got = b""
                while not got.endswith(b"ok"):
                    chunk = s.recv(4096)
                    if not chunk: sys.exit("connection closed early")
                    got += chunk
                conns.append(s)
            time.sleep(1.0)
            return conns

        kind = "TLS" if args.tls else "plain"
        # cold: the first N connections after start, one-off growth (allocator arenas, pools)
        # included, as an operator pays it the first time that many clients arrive
        before = rss_kib(proxy.pid)
        conns = open_idle(args.connections)
        after = rss_kib(proxy.pid)
        cold = (after - before) * 1024 / args.connections
        # warm: the same again once those have come and gone
        for s in conns: s.close()
        time.sleep(1.5)
        before2 = rss_kib(proxy.pid)
        conns = open_idle(args.connections)
        after2 = rss_kib(proxy.pid)
        warm = (after2 - before2) * 1024 / args.connections
        print(f"idle {kind} connections: {args.connections}; cold: proxy RSS {before} -> {after} KiB, "
              f"{cold:.0f} bytes per idle connection; warm (a second batch after the first closed): "
              f"{before2} -> {after2} KiB, {warm:.0f} bytes per idle connection (what the first batch left "
              f"behind is reused: the cold figure is what the first {args.connections} clients cost)")
        for s in conns: s.close()
    finally:
        proxy.terminate()
        try: proxy.wait(10)
        except subprocess.TimeoutExpired: proxy.kill()
        origin.shutdown()
        os.unlink(cfg.name)

if __name__ == "__main__":
    main()
