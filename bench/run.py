#!/usr/bin/env python3
"""The scenario runner: edgeshard, HAProxy and nginx side by side, same pinning, same origins.

    python3 bench/run.py                      # all scenarios, 3 rounds of 2 s slices
    python3 bench/run.py --smoke              # a few seconds: CI's check that it works
    python3 bench/run.py --scenarios A,D --rounds 5 --slice 3

Every system runs at once on its own ports, pinned to the proxy core(s); origins and the load
generator run on the other cores. The load moves between the systems in short slices, their
order rotated every round, so a machine whose speed drifts affects all alike. The figure that
holds on a noisy box is the proxy's CPU time per request (from /proc), reported with
throughput and latency as the median and spread of the rounds, with ratios against HAProxy and
nginx. Results: bench/results/latest.{md,json} and one SVG latency plot per scenario.
Scenarios: A plain keep-alive; B TLS both sides keep-alive (the Lync path); C a new TLS
connection per request, re-encrypting; D 1 MiB responses; E idle connections' RSS (plain and
TLS); F open-loop latency near HAProxy's capacity; R requests failed across reloads and
binary upgrades at a fixed load; H2 HTTP/2 clients (h2load, many streams per connection) to
an HTTP/1.1 origin; P and P2 TLS passed through by SNI (layer 4), keep-alive and a new
connection per request.
"""
import argparse, json, os, shutil, signal, socket, ssl, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def target_dir():
    """Where cargo puts the binaries (CARGO_TARGET_DIR or .cargo/config included)."""
    out = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["target_directory"]

BIN = os.path.join(target_dir(), "release")

def sh(*a, **k):
    return subprocess.run(list(a), check=True, **k)

def port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def wait_port(p, t=20, proc=None):
    end = time.time() + t
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", p), timeout=1).close(); return
        except OSError:
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.05)
    logs = ""
    if proc is not None:
        logs = f" ({' '.join(proc.args)} exited {proc.poll()})"
    raise SystemExit(f"nothing listens on {p}{logs}")

def cpu_split(pids):
    """(user, system) clock ticks the processes have used (utime, stime from /proc)."""
    u = k = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            u += int(fields[11]); k += int(fields[12])
        except OSError:
            pass
    return u, k

def cpu_ticks(pids):
    return sum(cpu_split(pids))

def tls_handshakes(admin_port):
    """edgeshard's own count of (full + resumed, resumed) TLS handshakes, from /metrics."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read().decode()
    total = resumed = 0
    for line in text.splitlines():
        if line.startswith("edgeshard_tls_handshakes_total{"): total += float(line.rsplit(" ", 1)[1])
        if line.startswith("edgeshard_tls_resumed_handshakes_total{"): resumed += float(line.rsplit(" ", 1)[1])
    return total, resumed

def h2_requests(admin_port):
    """edgeshard's own count of requests that came over HTTP/2, from /metrics."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith("edgeshard_requests_total{") and 'protocol="h2"' in l)

def rss_kib(pids):
    t = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        t += int(line.split()[1])
        except OSError:
            pass
    return t

def children(pid):
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(x) for x in out.split()]
    except OSError:
        return []

def ensure(pkg, binary):
    if shutil.which(binary):
        return True
    print(f"{binary} is missing: installing Debian's {pkg} with apt-get", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "-qq", pkg], env=env, capture_output=True)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", pkg], env=env, capture_output=True)
    ok = shutil.which(binary) is not None
    if not ok:
        print(f"  could not install {pkg}: {binary} left out of the comparison", flush=True)
    return ok

def ensure_module():
    """nginx's stream module (for P, P2), installed when missing."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-qq", "libnginx-mod-stream"], env=env, capture_output=True)
    ok = os.path.exists("/usr/lib/nginx/modules/ngx_stream_module.so")
    if not ok:
        print("  nginx's stream module is missing: nginx left out of P and P2", flush=True)
    return ok

def load_h2(a, url, seconds):
    """h2load (nghttp2): 16 connections of 32 concurrent streams each, for `seconds`; the
    protocol it negotiated is checked (a fall back to HTTP/1.1 would measure something else)."""
    log = os.path.join(a.tmp, "h2load.log")
    nload = len(a.load_cores.split(","))
    argv = ["taskset", "-c", a.load_cores, "h2load", "-c", "16", "-m", "32", "-t", str(nload),
            "-D", f"{int(seconds * 1000)}ms", "--log-file", log, url]
    r = subprocess.run(argv, capture_output=True, text=True)
    out = r.stdout
    if "Application protocol: h2" not in out:
        raise SystemExit(f"h2load did not speak h2 to {url}:\n{out}{r.stderr}")
    done = ok = 0
    for line in out.splitlines():
        if line.startswith("requests:"):
            f = line.replace(",", "").split()
            # requests: N total, N started, N done, N succeeded, N failed, ...
            done, ok = int(f[5]), int(f[7])
    lat = sorted(int(l.split("\t")[2]) for l in open(log) if l.count("\t") >= 2)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1000 if lat else None
    return {"requests": done, "rps": done / seconds, "errors": {"failed": done - ok},
            "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "p99_9": pct(0.999)}, "histogram_us": []}

class Systems:
    """Origins and the proxies under test, all started at once, all stopped at the end."""
    def __init__(self, a, tmp):
        self.procs, self.tmp, self.a = [], tmp, a
        pc, lc = a.proxy_cores, a.load_cores
        cert, key = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
        sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
           "-days", "2", "-subj", "/CN=bench.example", "-addext", "subjectAltName=DNS:bench.example",
           "-keyout", key, "-out", cert, capture_output=True)
        with open(os.path.join(tmp, "both.pem"), "w") as f:
            f.write(open(cert).read() + open(key).read())
        self.cert, self.key = cert, key
        self.o_small, self.o_tls, self.o_big = port(), port(), port()
        ob = os.path.join(BIN, "edgeshard-bench")
        self.spawn([ob, "origin", "--listen", f"127.0.0.1:{self.o_small}", "--cores", lc])
        self.spawn([ob, "origin", "--listen", f"127.0.0.1:{self.o_tls}", "--cores", lc, "--tls-cert", cert, "--tls-key", key])
        self.spawn([ob, "origin", "--listen", f"127.0.0.1:{self.o_big}", "--cores", lc, "--body-size", str(1 << 20)])
        for p in (self.o_small, self.o_tls, self.o_big):
            wait_port(p)
        self.ports = {}   # system -> {"plain", "tls", "big"}
        self.pids = {}    # system -> [pids]
        self.start_edgeshard("edgeshard", os.path.join(BIN, "edgeshard"))
        if a.baseline or a.baseline_engine:
            self.start_edgeshard("baseline", a.baseline or os.path.join(BIN, "edgeshard"),
                                 engine=a.baseline_engine)
        if not a.no_haproxy and ensure("haproxy", "haproxy"):
            self.start_haproxy()
        if not a.no_nginx and ensure("nginx-light", "nginx"):
            self.start_nginx()
        self.ports["direct"] = {"plain": self.o_small, "tls": self.o_tls, "big": self.o_big, "pass": self.o_tls}

    def spawn(self, argv, **k):
        log = open(os.path.join(self.tmp, f"{os.path.basename(argv[0])}-{len(self.procs)}.log"), "w")
        p = subprocess.Popen(argv, stdout=log, stderr=log, **k)
        self.procs.append(p)
        return p

    def edgeshard_cfg(self, p, weight=1000, splice=False, engine=None):
        cores = ", ".join(self.a.proxy_cores.split(","))
        return f'''[runtime]
cores = [{cores}]
{f'io_engine = "{engine}"' if engine else ""}
[admin]
listen = "127.0.0.1:{p["admin"]}"
[[virtual_service]]
name = "plain"
listen = "127.0.0.1:{p["plain"]}"
[[virtual_service.real_server]]
address = "127.0.0.1:{self.o_small}"
weight = {weight}
[[virtual_service]]
name = "tls"
listen = "127.0.0.1:{p["tls"]}"
[virtual_service.tls]
certificates = [ {{ cert = "{self.cert}", key = "{self.key}" }} ]
[virtual_service.reencrypt]
insecure_skip_verify = true
[[virtual_service.real_server]]
address = "127.0.0.1:{self.o_tls}"
weight = {weight}
[[virtual_service]]
name = "big"
listen = "127.0.0.1:{p["big"]}"
{"splice_response = true" if splice else ""}
[[virtual_service.real_server]]
address = "127.0.0.1:{self.o_big}"
[[virtual_service]]
name = "h2"
listen = "127.0.0.1:{p["h2"]}"
# h2load keeps 512 streams in flight: as many idle upstream connections kept (HAProxy keeps
# every one, nginx as many as keepalive says)
pool_size = 512
[virtual_service.tls]
certificates = [ {{ cert = "{self.cert}", key = "{self.key}" }} ]
[[virtual_service.real_server]]
address = "127.0.0.1:{self.o_small}"
[[virtual_service]]
name = "pass"
listen = "127.0.0.1:{p["pass"]}"
mode = "tcp"
[virtual_service.pass_through]
route_by_sni = true
[[virtual_service.real_server]]
address = "127.0.0.1:{self.o_tls}"
[[virtual_service.sub_service]]
name = "bench"
hosts = ["bench.example"]
[[virtual_service.sub_service.real_server]]
address = "127.0.0.1:{self.o_tls}"
'''

    def start_edgeshard(self, name, binary, extra=(), engine=None):
        p = {"plain": port(), "tls": port(), "big": port(), "h2": port(), "pass": port(), "admin": port()}
        path = os.path.join(self.tmp, f"{name}.toml")
        # --splice: this build's "big" service moves bodies by splice (a baseline runs as is)
        open(path, "w").write(self.edgeshard_cfg(p, splice=self.a.splice and name == "edgeshard", engine=engine))
        proc = self.spawn([binary, "run", "--config", path, *extra])
        for x in p.values():
            wait_port(x, proc=proc)
        self.ports[name], self.pids[name] = p, [proc.pid]
        return path

    def haproxy_cfg(self, p, weight=1):
        n = len(self.a.proxy_cores.split(","))
        cpu_map = "\n".join(f"  cpu-map 1/{i + 1} {c}" for i, c in enumerate(self.a.proxy_cores.split(",")))
        return f'''global
  nbthread {n}
{cpu_map}
  maxconn 9000
  tune.ssl.default-dh-param 2048
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  http-reuse always
frontend plain
  bind 127.0.0.1:{p["plain"]}
  default_backend plain
backend plain
  server s 127.0.0.1:{self.o_small} weight {weight}
frontend tls
  bind 127.0.0.1:{p["tls"]} ssl crt {os.path.join(self.tmp, "both.pem")} alpn http/1.1
  default_backend tls
backend tls
  server s 127.0.0.1:{self.o_tls} ssl verify none sni str(bench.example) weight {weight}
frontend big
  bind 127.0.0.1:{p["big"]}
  default_backend big
backend big
  server s 127.0.0.1:{self.o_big}
frontend h2
  bind 127.0.0.1:{p["h2"]} ssl crt {os.path.join(self.tmp, "both.pem")} alpn h2,http/1.1
  default_backend plain
frontend pass
  mode tcp
  bind 127.0.0.1:{p["pass"]}
  tcp-request inspect-delay 5s
  tcp-request content accept if {{ req_ssl_hello_type 1 }}
  use_backend pass if {{ req_ssl_sni -i bench.example }}
  default_backend pass
backend pass
  mode tcp
  server s 127.0.0.1:{self.o_tls}
'''

    def start_haproxy(self, name="haproxy", extra=()):
        p = {"plain": port(), "tls": port(), "big": port(), "h2": port(), "pass": port()}
        path = os.path.join(self.tmp, f"{name}.cfg")
        open(path, "w").write(self.haproxy_cfg(p))
        proc = self.spawn(["haproxy", *extra, "-f", path])
        for x in p.values():
            wait_port(x, proc=proc)
        self.ports[name], self.pids[name] = p, [proc.pid]
        return path

    def nginx_cfg(self, p, name, weight=1):
        cores = self.a.proxy_cores.split(",")
        ncpu = os.cpu_count() or 1
        masks = " ".join("".join("1" if i == int(c) else "0" for i in reversed(range(ncpu))) for c in cores)
        # 512: the streams h2load keeps in flight (H2); more than enough for the others
        up = lambda name, o: f"upstream {name} {{ server 127.0.0.1:{o} weight={weight}; keepalive 512; }}"
        loc = lambda scheme, name: (f"location / {{ proxy_pass {scheme}://{name}; proxy_http_version 1.1; "
                                    f"proxy_set_header Connection \"\"; proxy_ssl_session_reuse on; "
                                    f"proxy_ssl_server_name on; proxy_ssl_name bench.example; }}")
        stream_mod = "/usr/lib/nginx/modules/ngx_stream_module.so"
        stream = (f"""stream {{
  upstream pass {{ server 127.0.0.1:{self.o_tls}; }}
  map $ssl_preread_server_name $pass_to {{ bench.example pass; default pass; }}
  server {{ listen 127.0.0.1:{p["pass"]}; ssl_preread on; proxy_pass $pass_to; }}
}}""" if "pass" in p else "")
        load = f"load_module {stream_mod};" if "pass" in p else ""
        return f'''{load}
worker_processes {len(cores)};
worker_cpu_affinity {masks};
worker_rlimit_nofile 65536;
daemon off;
pid {self.tmp}/{name}.pid;
error_log {self.tmp}/{name}-error.log;
events {{ worker_connections 40000; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  {up("plain", self.o_small)}
  {up("tls", self.o_tls)}
  {up("big", self.o_big)}
  server {{ listen 127.0.0.1:{p["plain"]}; {loc("http", "plain")} }}
  server {{ listen 127.0.0.1:{p["tls"]} ssl; ssl_certificate {self.cert}; ssl_certificate_key {self.key};
           ssl_session_cache shared:S:10m; {loc("https", "tls")} }}
  server {{ listen 127.0.0.1:{p["big"]}; {loc("http", "big")} }}
  server {{ listen 127.0.0.1:{p["h2"]} ssl http2; ssl_certificate {self.cert}; ssl_certificate_key {self.key};
           {loc("http", "plain")} }}
}}
{stream}
'''

    def start_nginx(self, name="nginx"):
        p = {"plain": port(), "tls": port(), "big": port(), "h2": port()}
        # layer 4 needs the stream module (libnginx-mod-stream on Debian)
        if os.path.exists("/usr/lib/nginx/modules/ngx_stream_module.so") or ensure_module():
            p["pass"] = port()
        path = os.path.join(self.tmp, f"{name}.conf")
        open(path, "w").write(self.nginx_cfg(p, name))
        proc = self.spawn(["nginx", "-c", path])
        for x in p.values():
            wait_port(x, proc=proc)
        time.sleep(0.2)
        self.ports[name], self.pids[name] = p, [proc.pid] + children(proc.pid)
        return path

    def stop(self):
        for p in self.procs:
            try:
                p.send_signal(signal.SIGTERM)
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

def load(a, url, seconds, extra=()):
    out = os.path.join(a.tmp, "load.json")
    argv = [os.path.join(BIN, "edgeshard-bench"), "load", "--url", url, "--duration", str(seconds),
            "--cores", a.load_cores, "--quiet", "--json", out, *extra]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return json.load(open(out))

SCEN = {
    "A": ("plain HTTP/1.1 keep-alive, small bodies", "plain", "http", ["--connections", "32"]),
    "B": ("TLS both sides, keep-alive (the Lync path)", "tls", "https", ["--connections", "32", "--sni", "bench.example"]),
    # C: no session resumption on the client, so every connection is a full handshake (the
    # server's own counters are checked below); C2: what real clients do, resuming by ticket.
    "C": ("a new TLS connection per request, full handshake (no resumption), re-encrypting", "tls", "https", ["--connections", "16", "--new-connection", "--sni", "bench.example"]),
    "C2": ("a new TLS connection per request, resumed handshake, re-encrypting", "tls", "https", ["--connections", "16", "--new-connection", "--resume", "--sni", "bench.example"]),
    "D": ("1 MiB responses", "big", "http", ["--connections", "8"]),
    "H2": ("HTTP/2 clients (h2load: 16 connections x 32 streams), TLS, HTTP/1.1 to the origin", "h2", "https", None),
    # P, P2: the proxy relays the TLS bytes untouched (the origin terminates): its work is the
    # ClientHello's SNI, the choice and the relay
    "P": ("TLS passed through by SNI (layer 4), keep-alive", "pass", "https", ["--connections", "32", "--sni", "bench.example"]),
    "P2": ("TLS passed through by SNI (layer 4), a new connection per request", "pass", "https", ["--connections", "16", "--new-connection", "--sni", "bench.example"]),
}

def run_throughput(a, sysm, key, results):
    title, kind, scheme, extra = SCEN[key]
    names = [n for n in ("edgeshard", "baseline", "haproxy", "nginx", "direct")
             if kind in sysm.ports.get(n, {})]
    rounds = {n: [] for n in names}
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            url = f"{scheme}://127.0.0.1:{sysm.ports[n][kind]}/"
            pids = sysm.pids.get(n, [])
            admin = sysm.ports[n].get("admin")
            h0 = tls_handshakes(admin) if admin and kind == "tls" else None
            (u0, k0) = cpu_split(pids)
            e0 = h2_requests(admin) if admin and key == "H2" else None
            v = load_h2(a, url, a.slice) if extra is None else load(a, url, a.slice, extra)
            if e0 is not None and h2_requests(admin) - e0 < v["requests"]:
                # checked from the server side: each request came as an HTTP/2 stream
                raise SystemExit(f"{n}: fewer HTTP/2 requests counted than h2load sent")
            (u1, k1) = cpu_split(pids)
            hz = os.sysconf("SC_CLK_TCK")
            cpu_s = (u1 + k1 - u0 - k0) / hz
            per = cpu_s * 1e6 / max(v["requests"], 1)
            user = (u1 - u0) / hz * 1e6 / max(v["requests"], 1)
            resumed = None
            if h0 is not None:
                # checked from the server side: what the handshakes really were
                h1 = tls_handshakes(admin)
                done = h1[0] - h0[0]
                resumed = (h1[1] - h0[1]) / done if done else None
            rounds[n].append({"rps": v["rps"], "cpu_us_per_req": per if pids else None,
                              "user_us_per_req": user if pids else None, "resumed": resumed,
                              "p50": v["latency_ms"]["p50"], "p99": v["latency_ms"]["p99"], "p999": v["latency_ms"]["p99_9"],
                              "errors": sum(v["errors"].values()), "hist": v["histogram_us"]})
    results[key] = {"title": title, "systems": rounds}

def open_loop(a, sysm, rate):
    names = [n for n in ("edgeshard", "baseline", "haproxy", "nginx") if n in sysm.ports]
    rounds = {n: [] for n in names}
    hz = os.sysconf("SC_CLK_TCK")
    for r in range(a.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            pids = sysm.pids.get(n, [])
            t0 = cpu_ticks(pids)
            v = load(a, f"http://127.0.0.1:{sysm.ports[n]['plain']}/", a.slice, ["--connections", "32", "--rate", str(rate)])
            cpu = (cpu_ticks(pids) - t0) / hz * 1e6 / max(v["requests"], 1)
            rounds[n].append({"rps": v["rps"], "p50": v["latency_ms"]["p50"], "p99": v["latency_ms"]["p99"],
                              "p999": v["latency_ms"]["p99_9"], "errors": sum(v["errors"].values()), "hist": v["histogram_us"],
                              "cpu_us_per_req": cpu})
    return rounds

# R: reloads and upgrades under a fixed load, counted by the clients.
RELOADS, UPGRADES = 5, 2

def run_reload(a, sysm, results):
    """Each system in turn, its own instance, under four fixed-rate loads at once (plain and
    TLS; keep-alive and a new connection per request): edgeshard reloads RELOADS times (a real
    change each time: the weights) and upgrades its binary UPGRADES times; HAProxy (master-
    worker, seamless: -W) and nginx reload RELOADS + UPGRADES times (each of their reloads is
    new worker processes). Clients resend once a request whose reused keep-alive connection
    closed before any byte (as HTTP clients do): counted as retried, not failed."""
    bench = os.path.join(BIN, "edgeshard-bench")
    actions = RELOADS + UPGRADES
    gap = 0.3 if a.smoke else 1.0
    seconds = gap * (actions + 2)
    rate = 400 if a.smoke else a.reload_rate
    out = {}
    for name in ("edgeshard", "haproxy", "nginx"):
        if name not in sysm.ports:
            continue
        inst = f"{name}-reload"
        pid_file = os.path.join(a.tmp, f"{inst}.pid")
        if name == "edgeshard":
            path = sysm.start_edgeshard(inst, os.path.join(BIN, "edgeshard"), ["--pid-file", pid_file])
        elif name == "haproxy":
            path = sysm.start_haproxy(inst, ["-W"])
        else:
            path = sysm.start_nginx(inst)
        ports, master = sysm.ports[inst], sysm.pids[inst][0]
        loads = []
        for kind, scheme, new in (("plain", "http", False), ("plain", "http", True), ("tls", "https", False), ("tls", "https", True)):
            j = os.path.join(a.tmp, f"{inst}-{kind}-{new}.json")
            argv = [bench, "load", "--url", f"{scheme}://127.0.0.1:{ports[kind]}/", "--duration", str(seconds),
                    "--cores", a.load_cores, "--quiet", "--json", j, "--connections", "4", "--rate", str(rate / 4),
                    "--retry-reused"] + (["--new-connection"] if new else []) + (["--sni", "bench.example"] if kind == "tls" else [])
            loads.append((subprocess.Popen(argv, stdout=subprocess.DEVNULL), j))
        done = []
        time.sleep(gap)
        for i in range(actions):
            w = 2000 if i % 2 == 0 else 1000
            if name == "edgeshard":
                open(path, "w").write(sysm.edgeshard_cfg(ports, w))
                op = "reload" if i < RELOADS else "upgrade"
                r = subprocess.run([os.path.join(BIN, "edgeshard"), op, "--pid-file", pid_file], capture_output=True, text=True)
                done.append(op if r.returncode == 0 else f"{op} FAILED: {r.stderr.strip()}")
            elif name == "haproxy":
                open(path, "w").write(sysm.haproxy_cfg(ports, 2 if i % 2 == 0 else 1))
                os.kill(master, signal.SIGUSR2)
                done.append("reload")
            else:
                open(path, "w").write(sysm.nginx_cfg(ports, inst, 2 if i % 2 == 0 else 1))
                os.kill(master, signal.SIGHUP)
                done.append("reload")
            time.sleep(gap)
        total = {"requests": 0, "failed": 0, "retried": 0}
        for proc, j in loads:
            proc.wait()
            v = json.load(open(j))
            total["requests"] += v["requests"]
            total["failed"] += sum(v["errors"].values())
            total["retried"] += v.get("retried", 0)
        total["actions"] = done
        out[name] = total
        # this instance goes (an upgraded edgeshard is no longer the process we started)
        for pid in {master, *(int(open(pid_file).read()) for _ in [0] if name == "edgeshard" and os.path.exists(pid_file))}:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        del sysm.ports[inst], sysm.pids[inst]
    results["R"] = {"title": f"{RELOADS} reloads and {UPGRADES} binary upgrades (HAProxy, nginx: {actions} reloads) under {rate} req/s of plain and TLS, keep-alive and new connections", "reload": out}

def run_open_loop(a, sysm, results):
    base = results.get("A", {}).get("systems", {})
    # F: a rate near HAProxy's capacity (else edgeshard's), measured on scenario A
    ref = base.get("haproxy") or base.get("edgeshard") or [{"rps": 5000}]
    rate = 0.8 * statistics.median(x["rps"] for x in ref)
    results["F"] = {"title": f"open-loop latency at {rate:.0f} req/s (80% of HAProxy's A throughput)",
                    "systems": open_loop(a, sysm, rate)}
    # F2: every system at the same rate, half the slowest one's capacity: CPU per request
    # without the bias a faster system gets from a busier load core (fewer wake-ups)
    caps = [statistics.median(x["rps"] for x in v) for n, v in base.items() if n != "direct" and v]
    rate2 = 0.5 * min(caps) if caps else 5000
    results["F2"] = {"title": f"plain keep-alive at the same open-loop rate for all, {rate2:.0f} req/s",
                     "systems": open_loop(a, sysm, rate2)}

def run_idle(a, sysm, results):
    n = a.idle
    out = {}
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    for name in [x for x in ("edgeshard", "baseline", "haproxy", "nginx") if x in sysm.ports]:
        for kind in ("plain", "tls"):
            pids = sysm.pids[name] + (children(sysm.pids[name][0]) if name == "nginx" else [])
            # Warm-up: a burst of connections opened and closed first, so that memory the
            # allocator freed earlier (previous scenarios) is returned before `before`, not
            # in the middle of the measurement.
            warm = []
            try:
                for _ in range(max(n // 10, 1)):
                    s = socket.create_connection(("127.0.0.1", sysm.ports[name][kind]), timeout=10)
                    if kind == "tls":
                        s = ctx.wrap_socket(s, server_hostname="bench.example")
                    s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
                    s.recv(4096)
                    warm.append(s)
            except OSError:
                pass
            for s in warm: s.close()
            time.sleep(1.0)
            before = rss_kib(pids)
            conns = []
            try:
                for _ in range(n):
                    s = socket.create_connection(("127.0.0.1", sysm.ports[name][kind]), timeout=10)
                    if kind == "tls":
                        s = ctx.wrap_socket(s, server_hostname="bench.example")
                    s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
                    got = b""
                    while b"\r\n\r\n" not in got or len(got) < got.index(b"\r\n\r\n") + 4 + 13:
                        c = s.recv(4096)
                        if not c:
                            break
                        got += c
                    conns.append(s)
            except OSError as e:
                print(f"  {name} {kind}: stopped after {len(conns)} idle connections: {e}", flush=True)
            time.sleep(1.0)
            after = rss_kib(pids)
            out.setdefault(name, {})[kind] = (after - before) * 1024 / n if len(conns) == n else None
            for s in conns: s.close()
            time.sleep(0.5)
    results["E"] = {"title": f"RSS per idle connection ({n} connections after a warm-up of {max(n // 10, 1)}, bytes)", "idle": out}

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def spread(xs):
    xs = [x for x in xs if x is not None]
    return (min(xs), max(xs)) if xs else (None, None)

def fmt(x, d=1):
    return "–" if x is None else f"{x:.{d}f}"

def report(a, results, meta):
    lines = [f"# edgeshard bench — {meta['date']}", "", f"Machine: {meta['machine']}. Proxy cores {a.proxy_cores}, load and origins on {a.load_cores}. "
             f"{a.rounds} rounds of {a.slice} s slices per system, order rotated. Versions: {meta['versions']}.", "",
             f"Command: `{meta['command']}`", ""]
    for key in ("A", "B", "C", "C2", "D", "H2", "P", "P2", "F", "F2"):
        if key not in results: continue
        r = results[key]
        lines += [f"## {key}: {r['title']}", "", "| system | req/s (median, min–max) | CPU µs per request | of it user space | p50 ms | p99 ms | p99.9 ms | errors |", "|---|---|---|---|---|---|---|---|"]
        for name, rounds in r["systems"].items():
            lo, hi = spread([x["rps"] for x in rounds])
            cpu = med([x["cpu_us_per_req"] for x in rounds])
            user = med([x.get("user_us_per_req") for x in rounds])
            lines.append(f"| {name} | {fmt(med([x['rps'] for x in rounds]), 0)} ({fmt(lo, 0)}–{fmt(hi, 0)}) | {fmt(cpu)} | {fmt(user)} | "
                         f"{fmt(med([x['p50'] for x in rounds]), 3)} | {fmt(med([x['p99'] for x in rounds]), 3)} | {fmt(med([x['p999'] for x in rounds]), 3)} | {sum(x['errors'] for x in rounds)} |")
        res = [x.get("resumed") for x in r["systems"].get("edgeshard", []) if x.get("resumed") is not None]
        if res:
            lines.append(f"\nedgeshard's own count: {100 * statistics.median(res):.0f} % of the TLS handshakes were resumed")
        es = med([x["cpu_us_per_req"] for x in r["systems"].get("edgeshard", [])])
        for other in ("baseline", "haproxy", "nginx"):
            o = med([x["cpu_us_per_req"] for x in r["systems"].get(other, [])])
            if es and o:
                lines.append(f"\nedgeshard / {other} CPU per request: **{es / o:.2f}×**")
                eu = med([x.get("user_us_per_req") for x in r["systems"].get("edgeshard", [])])
                ou = med([x.get("user_us_per_req") for x in r["systems"].get(other, [])])
                if eu and ou:
                    lines.append(f"\nedgeshard / {other} user-space CPU per request: **{eu / ou:.2f}×**")
            if key in ("F", "F2") and other in r["systems"] and "edgeshard" in r["systems"]:
                e99, o99 = med([x["p99"] for x in r["systems"]["edgeshard"]]), med([x["p99"] for x in r["systems"][other]])
                lines.append(f"\nedgeshard / {other} p99: **{e99 / o99:.2f}×**")
        lines.append("")
    if "R" in results:
        lines += [f"## R: {results['R']['title']}", "", "| system | requests | failed | retried (reused connection closed before answering) | what was done |", "|---|---|---|---|---|"]
        for name, v in results["R"]["reload"].items():
            acts = ", ".join(f"{n}× {k}" for k, n in sorted({x: v['actions'].count(x) for x in v['actions']}.items()))
            lines.append(f"| {name} | {v['requests']} | {v['failed']} | {v['retried']} | {acts} |")
        lines.append("")
    if "E" in results:
        lines += [f"## E: {results['E']['title']}", "", "| system | plain | TLS |", "|---|---|---|"]
        for name, v in results["E"]["idle"].items():
            lines.append(f"| {name} | {fmt(v.get('plain'), 0)} | {fmt(v.get('tls'), 0)} |")
        es = results["E"]["idle"].get("edgeshard", {})
        for other in ("baseline", "haproxy", "nginx"):
            o = results["E"]["idle"].get(other, {})
            if es.get("tls") and o.get("tls"):
                lines.append(f"\nedgeshard / {other} RSS per idle TLS connection: **{es['tls'] / o['tls']:.2f}×**")
        lines.append("")
    return "\n".join(lines)

def svg(key, r, path):
    # latency percentile curves (log ms) per system
    W, H, L, B = 640, 320, 60, 40
    colors = {"edgeshard": "#1f77b4", "haproxy": "#d62728", "nginx": "#2ca02c", "direct": "#7f7f7f"}
    curves = {n: rounds[len(rounds) // 2]["hist"] for n, rounds in r["systems"].items() if rounds}
    vals = [v for h in curves.values() for v in h if v > 0]
    if not vals: return
    import math
    lo, hi = math.log10(min(vals)), math.log10(max(vals) * 1.1)
    y = lambda v: B + (H - 2 * B) * (1 - (math.log10(max(v, 1)) - lo) / max(hi - lo, 1e-9))
    x = lambda i: L + (W - L - 20) * i / 99
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
             f'<text x="{L}" y="20">{key}: {r["title"]} — latency by percentile (ms, log)</text>',
             f'<line x1="{L}" y1="{H-B}" x2="{W-20}" y2="{H-B}" stroke="#999"/><line x1="{L}" y1="{B}" x2="{L}" y2="{H-B}" stroke="#999"/>']
    for k in range(int(lo), int(hi) + 1):
        v = 10 ** k
        if lo <= k <= hi:
            parts.append(f'<text x="5" y="{y(v)+4:.0f}">{v/1000:g}</text>')
    for p in (0, 50, 90, 99):
        parts.append(f'<text x="{x(p-1 if p else 0):.0f}" y="{H-B+15}">p{p}</text>')
    for i, (n, h) in enumerate(curves.items()):
        pts = " ".join(f"{x(j):.1f},{y(v):.1f}" for j, v in enumerate(h))
        parts.append(f'<polyline fill="none" stroke="{colors.get(n, "#000")}" stroke-width="1.5" points="{pts}"/>')
        parts.append(f'<text x="{W-120}" y="{B+14*i}" fill="{colors.get(n, "#000")}">{n}</text>')
    parts.append("</svg>")
    open(path, "w").write("\n".join(parts))

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="A,B,C,C2,D,H2,P,P2,E,F,R")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slice", type=float, default=2.0, help="seconds of load per system per round")
    ap.add_argument("--idle", type=int, default=5000, help="idle connections for scenario E (mind the open-files limit)")
    ap.add_argument("--reload-rate", type=float, default=4000, help="requests per second in total during scenario R")
    ap.add_argument("--proxy-cores", default="0")
    ap.add_argument("--load-cores", default=None, help="default: every other CPU")
    ap.add_argument("--baseline", default=None, help="another edgeshard binary (an earlier build) run side by side as 'baseline'")
    ap.add_argument("--baseline-engine", default=None, choices=["epoll", "io_uring"],
                    help="run the baseline (this build unless --baseline) with this runtime.io_engine: the two engines side by side")
    ap.add_argument("--splice", action="store_true", help="edgeshard's D service with splice_response = true")
    ap.add_argument("--no-haproxy", action="store_true")
    ap.add_argument("--no-nginx", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="seconds, not minutes: checks the runner works")
    ap.add_argument("--out", default=None, help="where the report goes (default bench/results; with --smoke a temporary folder, so smoke figures never replace the committed ones)")
    a = ap.parse_args()
    if a.smoke:
        a.rounds, a.slice, a.idle = 1, 0.5, 200
    if a.out is None:
        a.out = tempfile.mkdtemp(prefix="edgeshard-smoke-") if a.smoke else os.path.join(ROOT, "bench", "results")
    ncpu = os.cpu_count() or 1
    proxy = [int(c) for c in a.proxy_cores.split(",")]
    a.load_cores = a.load_cores or ",".join(str(c) for c in range(ncpu) if c not in proxy) or "0"
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    subprocess.run(["cargo", "build", "--release", "--workspace", "--quiet"], cwd=ROOT, check=True)
    a.tmp = tempfile.mkdtemp(prefix="edgeshard-bench-")
    print(f"work directory (configs, logs): {a.tmp}", flush=True)
    try:
        run_all(a, ncpu)
    finally:
        # removed on every exit path, a crash included
        shutil.rmtree(a.tmp, ignore_errors=True)

def run_all(a, ncpu):
    os.makedirs(a.out, exist_ok=True)
    sysm = Systems(a, a.tmp)
    results = {}
    try:
        for key in a.scenarios.split(","):
            if key == "H2" and not ensure("nghttp2-client", "h2load"):
                continue
            print(f"scenario {key} …", flush=True)
            if key in SCEN: run_throughput(a, sysm, key, results)
            elif key == "F": run_open_loop(a, sysm, results)
            elif key == "E": run_idle(a, sysm, results)
            elif key == "R": run_reload(a, sysm, results)
    finally:
        sysm.stop()
    ver = lambda argv: (subprocess.run(argv, capture_output=True, text=True).stdout + subprocess.run(argv, capture_output=True, text=True).stderr).strip().splitlines()[0] if shutil.which(argv[0]) else "absent"
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{ncpu} CPUs, {open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip() if 'model name' in open('/proc/cpuinfo').read() else 'unknown CPU'}, kernel {os.uname().release}",
            "versions": f"edgeshard {ver([os.path.join(BIN, 'edgeshard'), '--version'])}; {ver(['haproxy', '-v'])}; {ver(['nginx', '-v'])}",
            "command": " ".join(["python3", "bench/run.py"] + sys.argv[1:])}
    md = report(a, results, meta)
    open(os.path.join(a.out, "latest.md"), "w").write(md)
    json.dump({"meta": meta, "results": results}, open(os.path.join(a.out, "latest.json"), "w"), indent=1)
    for key in ("A", "B", "C", "C2", "D", "F", "F2"):
        if key in results: svg(key, results[key], os.path.join(a.out, f"latency-{key}.svg"))
    print(md)

if __name__ == "__main__":
    main()
