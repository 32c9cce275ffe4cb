//! Every configuration key: its type, default and a line of documentation, printed by
//! `edgeshard config reference` and committed as docs/configuration.md.
//!
//! Kept honest two ways by tests: the keys of each section here are exactly the fields the
//! parser (`file.rs`, serde with `deny_unknown_fields`) accepts there, and the committed
//! document is exactly what this table prints.

/// One key of one section.
pub struct Key {
    pub name: &'static str,
    pub ty: &'static str,
    /// "required", or the value used when the key is absent.
    pub default: &'static str,
    pub doc: &'static str,
}

/// A table of the file, e.g. `[[virtual_service]]`, with its keys in the order shown.
pub struct Section {
    /// As written in the file (`[[...]]` for arrays of tables).
    pub header: &'static str,
    /// Where the same table also appears.
    pub also: &'static str,
    pub doc: &'static str,
    pub keys: &'static [Key],
}

const fn k(name: &'static str, ty: &'static str, default: &'static str, doc: &'static str) -> Key {
    Key {
        name,
        ty,
        default,
        doc,
    }
}

pub const SECTIONS: &[Section] = &[
    Section {
        header: "[runtime]",
        also: "",
        doc: "Shards, cores and process-wide settings. Optional.",
        keys: &[
            k("cores", "list of integers", "every CPU the process may use", "One shard per listed CPU, pinned to it."),
            k("shards", "integer", "(see cores)", "Instead of `cores`: this many shards over the first CPUs."),
            k("oversubscribe", "bool", "false", "Allow more shards than CPUs, or a CPU listed twice (tests, small boxes)."),
            k("drain_timeout", "duration", "30s", "At SIGTERM/SIGINT or after an upgrade: how long requests in flight may take to finish."),
            k("ring_depth", "integer", "256", "io_uring entries per shard (a power of two, 8..4096)."),
            k("io_memory", "size", "1MiB", "Memory glommio registers (and locks) for io_uring per shard; edgeshard's socket I/O does not use it, so keep it small."),
            k("spin_before_park", "duration", "0s", "Busy-poll this long before an idle shard sleeps (0: never)."),
            k("poll_before_park", "duration", "200us", "An idle shard waits this long in epoll_wait before it parks (0..10ms)."),
            k("io_engine", "string", "epoll", "How shards drive their sockets: `epoll` (readiness, then recv/send) or `io_uring` (a ring per shard: multishot receive into provided buffers, the sends of a loop turn in one system call; no `splice_response`). See docs/bench.md for which is faster where."),
            k("io_uring_buffers", "integer", "256", "With `io_engine = \"io_uring\"`: 16 KiB receive buffers per shard (a power of two, 16..32768; 256 is 4 MiB a shard, resident once traffic has used them all). Only data received and not yet read holds one; a socket holds at most 64 KiB or 4 buffers, and when all are taken sockets (and PROXY headers) are read directly until a quarter are free again."),
            k("backlog", "integer", "1024", "Listen backlog per shard and virtual service."),
            k("max_connections", "integer", "0", "Client connections the appliance holds at once; each shard takes its share (0: no limit)."),
            k("persistence_key", "string (64 hex)", "random at each start", "Signs persistence cookies; the same on every appliance that must honour the others' cookies."),
            k("ticket_key_file", "path", "random at each start", "TLS session-ticket master keys (64 hex digits a line, newest last), shared by a pair so resumption survives failover."),
            k("pid_file", "path", "none", "Where `run` writes its PID once serving (`--pid-file` wins); reload/upgrade outcomes go to `<pid_file>.status`."),
            k("shard", "array of tables", "none", "Per-core overrides: see `[[runtime.shard]]`."),
        ],
    },
    Section {
        header: "[[runtime.shard]]",
        also: "",
        doc: "Overrides for the shard(s) on one core.",
        keys: &[
            k("core", "integer", "required", "The CPU these settings apply to (one of `runtime.cores`)."),
            k("ring_depth", "integer", "runtime.ring_depth", "io_uring entries of this shard."),
            k("io_memory", "size", "runtime.io_memory", "Registered buffer memory of this shard."),
            k("spin_before_park", "duration", "runtime.spin_before_park", "Busy-poll time of this shard."),
            k("poll_before_park", "duration", "runtime.poll_before_park", "epoll wait before this shard parks."),
            k("backlog", "integer", "runtime.backlog", "Listen backlog of this shard's listeners."),
            k("max_connections", "integer", "its share of runtime.max_connections", "Client connections this shard holds at once."),
            k("services", "list of strings", "every service", "Only these virtual services (by name) are served on this core."),
        ],
    },
    Section {
        header: "[admin]",
        also: "",
        doc: "The admin listener: status page, /status, /metrics, /healthz and the runtime API (on shard 0). No admin listener without it.",
        keys: &[
            k("listen", "address", "required", "IP:port of the admin listener. A reload cannot change it."),
            k("token", "array of tables", "none", "API tokens: see `[[admin.token]]`. Without one, only the read-only pages are served."),
            k("public_metrics", "bool", "true on a loopback listener, else false", "/metrics and /healthz readable without a token."),
            k("hosts", "list of strings", "none", "Host names the listener answers to besides IP literals and localhost (DNS rebinding)."),
            k("state_file", "path", "none", "Runtime changes (operator state, weights, added/removed servers) are kept here and survive a restart."),
            k("history_interval", "duration", "5s", "Resolution of the 15-minute in-memory history (status page plots, /api/v1/history), 1s..60s; read at start."),
            k("tls", "table {cert, key}", "none", "HTTPS on the admin listener: `tls = { cert = \"admin.pem\", key = \"admin.key\" }`."),
            k("allow", "list of CIDRs", "everyone", "Client addresses allowed to reach the admin listener."),
            k("deny", "list of CIDRs", "none", "Client addresses refused (deny wins over allow)."),
        ],
    },
    Section {
        header: "[[admin.token]]",
        also: "",
        doc: "One API token (`edgeshard token new` prints one with these lines). Sent as `Authorization: Bearer <token>`.",
        keys: &[
            k("name", "string", "required", "Appears in the audit (security) log."),
            k("role", "read | operator | admin", "required", "read: status and history; operator: state, weights, servers; admin: also reload."),
            k("sha256", "string (64 hex)", "(one of sha256, token_file)", "SHA-256 of the token; the token itself never appears in the config."),
            k("token_file", "path", "(one of sha256, token_file)", "A file holding the token itself (mode 0600 or stricter, checked)."),
        ],
    },
    Section {
        header: "[admin.tls]",
        also: "[[virtual_service.tls.certificates]] entries",
        doc: "A certificate and its key (PEM; the chain leaf first; keys PKCS#8, PKCS#1 or SEC1).",
        keys: &[
            k("cert", "path", "required", "PEM certificate chain, leaf first."),
            k("key", "path", "required", "PEM private key matching the certificate."),
            k("ocsp_response_file", "path", "none", "Services only: a DER OCSP response for this certificate, fetched by the operator (checked at load, re-read when due; implies stapling)."),
        ],
    },
    Section {
        header: "[log]",
        also: "",
        doc: "Where the three ESP logs go (no log file when absent). Paths are relative to the config file, or \"stdout\". SIGUSR1 reopens them.",
        keys: &[
            k("user_access", "path | \"stdout\"", "none", "One record per request: client, host, path, status, real server, times."),
            k("security", "path | \"stdout\"", "none", "Refusals (ESP, access lists, limits, bad requests), API mutations, reloads."),
            k("connection", "path | \"stdout\"", "none", "One record per client connection: bytes, duration, TLS, why it closed."),
            k("format", "json | text", "json", "Record format (text: key=value)."),
        ],
    },
    Section {
        header: "[[virtual_service]]",
        also: "",
        doc: "A listener and the pool of real servers behind it (a LoadMaster Virtual Service).",
        keys: &[
            k("name", "string", "vs<N>", "Name used in logs, metrics, the status page and the API."),
            k("listen", "address", "required", "IP:port; each shard binds it with SO_REUSEPORT."),
            k("mode", "http | tcp", "http", "tcp: bytes relayed both ways as they are (layer 4; TLS terminated, passed through or absent); no HTTP setting applies."),
            k("pass_through", "table", "none", "tcp services: TLS left to the real servers: see `[virtual_service.pass_through]`."),
            k("send_proxy", "\"v2\"", "none", "tcp services: every connection to a real server starts with a PROXY protocol v2 header naming the client."),
            k("accept_proxy", "bool", "false", "Connections from `trusted_proxies` start with a PROXY header (v1 or v2) naming the client; connections from anyone else are refused."),
            k("scheduling", "round-robin | weighted-round-robin | least-connection | weighted-least-connection", "round-robin", "How a real server is chosen (least connection over the appliance-wide view)."),
            k("idle_timeout", "duration", "1800s", "Client idle time between requests on a keep-alive connection."),
            k("connect_timeout", "duration", "5s", "Connecting to a real server: 504 past it (502 if refused), after retries."),
            k("response_timeout", "duration", "60s", "A real server's response head (and each write to it): 504 past it."),
            k("request_timeout", "duration", "30s", "A started request head must arrive within it: 408."),
            k("client_body_timeout", "duration", "30s", "Longest wait for the next piece of a request body."),
            k("upstream_body_timeout", "duration", "60s", "Longest wait for the next piece of a response body."),
            k("client_write_timeout", "duration", "60s", "Longest wait for a client to take more response bytes, each write (nginx's send_timeout: a slow reader that keeps reading is not cut); over HTTP/2 also for the client to open a stream's flow-control window (then the stream is reset) or to read its socket at all (then the connection is)."),
            k("tunnel_idle_timeout", "duration", "1800s", "A WebSocket (or other upgraded) tunnel idle this long is closed."),
            k("max_body_size", "size", "0 (no limit)", "Largest request body accepted: 413 beyond."),
            k("max_connections", "integer", "0 (no limit)", "Client connections this service holds at once, across shards."),
            k("client_limits", "table", "none", "Per client address limits: see `[virtual_service.client_limits]`."),
            k("queue_timeout", "duration", "0s", "When every real server is at its connection limit: wait this long for room (0: 503 at once)."),
            k("queue_size", "integer", "128", "Requests that may wait for room, per shard."),
            k("pool_size", "integer", "64", "Idle upstream connections kept per real server per shard."),
            k("pool_idle_timeout", "duration", "30s", "An idle pooled upstream connection older than this is not reused."),
            k("retries", "integer", "2", "Other real servers tried when connecting fails or nothing was sent (0..10)."),
            k("passive_fall", "integer", "3", "Connect failures or resets in a row that take a real server out at once (0: off)."),
            k("slow_start", "duration", "0s", "A real server back up ramps its weight over this long."),
            k("max_request_line", "size", "8KiB", "Longest request line: 414 beyond."),
            k("max_header_size", "size", "16KiB", "Whole request head: 431 beyond."),
            k("max_headers", "integer", "100", "Header fields per request (1..256): 431 beyond."),
            k("path_normalization", "forward | refuse", "forward", "A path that normalisation changes (`/%61dmin`, `/x/../admin`): forwarded normalised, or 400."),
            k("forwarded_for", "replace | append", "replace", "The client's X-Forwarded-For: replaced by its address, or appended to."),
            k("trusted_proxies", "list of CIDRs", "none", "Peers whose forwarding headers (and PROXY headers, with accept_proxy) are believed."),
            k("forwarded_header", "bool", "false", "Also send an RFC 7239 Forwarded header (for=, proto=, host=)."),
            k("h2c", "bool", "false", "On a service without TLS, also take HTTP/2 by prior knowledge (a client that starts with the HTTP/2 preface, `curl --http2-prior-knowledge`), as HAProxy's `proto h2`; without it such a client gets 505. TLS services negotiate HTTP/2 by ALPN (`[virtual_service.tls] http2`)."),
            k("splice_response", "bool", "false", "Plain response bodies of at least 256 KiB, to a plain client, move socket → pipe → socket with splice(2), never copied to user space (HAProxy's `option splice-response`): less CPU per MiB, a little more latency (docs/bench.md)."),
            k("shard_steering", "kernel | source-ip", "kernel", "Which shard gets a connection: the kernel's hash, or one shard per client address (reuseport BPF). Source-IP persistence and client limits imply source-ip."),
            k("access", "table", "everyone", "IP access list checked at accept: see `[virtual_service.access]`."),
            k("headers", "table", "none", "Header rules and HSTS: see `[virtual_service.headers]`."),
            k("tls", "table", "none (plain HTTP)", "TLS termination: see `[virtual_service.tls]`."),
            k("reencrypt", "table", "none (plain to real servers)", "TLS to the real servers: see `[virtual_service.reencrypt]`."),
            k("redirect", "table", "none", "Answer every request with a redirect to HTTPS: see `[virtual_service.redirect]`."),
            k("persistence", "table", "mode = none", "See `[virtual_service.persistence]`."),
            k("health_check", "table", "none (servers always up)", "See `[virtual_service.health_check]`."),
            k("esp", "table", "none", "Edge Security Pack: see `[virtual_service.esp]`."),
            k("sub_service", "array of tables", "none", "Sub-services by host and path: see `[[virtual_service.sub_service]]`."),
            k("real_server", "array of tables", "none", "The service's own pool: see `[[virtual_service.real_server]]`."),
        ],
    },
    Section {
        header: "[[virtual_service.real_server]]",
        also: "[[virtual_service.sub_service.real_server]]",
        doc: "A real server of the pool.",
        keys: &[
            k("address", "address", "required", "IP:port (or host:port, resolved once at load)."),
            k("weight", "integer", "1000", "1..65535, used by the weighted methods (and set at runtime by the API)."),
            k("connection_limit", "integer", "0 (no limit)", "Active connections to this server, appliance-wide."),
            k("send_proxy", "\"v2\"", "the service's send_proxy", "tcp services: a PROXY protocol v2 header to this server."),
        ],
    },
    Section {
        header: "[virtual_service.pass_through]",
        also: "",
        doc: "TLS passed through by a tcp service: the ClientHello is read (bounded by request_timeout and 16 KiB), never answered, and forwarded byte for byte.",
        keys: &[
            k("route_by_sni", "bool", "true", "Choose the sub-service whose hosts match the ClientHello's server name; none, or no name: the service's own pool."),
        ],
    },
    Section {
        header: "[virtual_service.tls]",
        also: "",
        doc: "TLS termination: the service speaks HTTPS to clients (TLS 1.2 and 1.3, AEAD suites).",
        keys: &[
            k("certificates", "list of {cert, key}", "required", "Chosen by SNI against each certificate's DNS names; the first answers clients without SNI or with an unknown name."),
            k("handshake_timeout", "duration", "10s", "A client handshake not done by then is closed."),
            k("ocsp_stapling", "bool", "false", "Staple each certificate's OCSP status, fetched from the responder its AIA extension names (http://) off the shards, verified, refreshed halfway to nextUpdate; the cert file must hold the issuer after the leaf."),
            k("http2", "bool", "true", "Offer HTTP/2 (ALPN h2, then http/1.1); each stream takes the same request path as HTTP/1.1. tcp services offer no ALPN."),
        ],
    },
    Section {
        header: "[virtual_service.reencrypt]",
        also: "",
        doc: "TLS to the real servers (and HTTPS health checks by default).",
        keys: &[
            k("ca", "path", "none", "PEM trust anchors for the real servers' certificates."),
            k("server_name", "string", "each real server's host", "SNI sent and name verified."),
            k("insecure_skip_verify", "bool", "false", "Do not verify real servers' certificates (a warning at start)."),
        ],
    },
    Section {
        header: "[virtual_service.redirect]",
        also: "",
        doc: "Every request is answered with a redirect to https://<host><path>.",
        keys: &[
            k("https_port", "integer", "443", "Port of the HTTPS service (omitted from the URL when 443)."),
            k("status", "301 | 302 | 307 | 308", "301", "Redirect status."),
        ],
    },
    Section {
        header: "[virtual_service.persistence]",
        also: "[virtual_service.sub_service.persistence]",
        doc: "Keep a client on one real server.",
        keys: &[
            k("mode", "none | active-cookie | source-ip", "none", "active-cookie: a signed cookie names the server; source-ip: a table per shard by client address."),
            k("cookie", "string", "EDGESHARD", "Cookie name (active-cookie)."),
            k("timeout", "duration", "20m", "Persistence lasts this long after the last use (it slides)."),
            k("max_entries", "integer", "100000", "Source-IP table entries per shard."),
        ],
    },
    Section {
        header: "[virtual_service.health_check]",
        also: "[virtual_service.sub_service.health_check]",
        doc: "Active checks of every real server of the pool, from shard 0; the result is shared by every shard.",
        keys: &[
            k("type", "http | https | tcp | tls", "tcp on tcp services, https when re-encrypting, else http", "What a check does: an HTTP request (http, https), a TCP connect (tcp), or a TLS handshake and nothing more (tls: with the [reencrypt] settings when the service has them, else unverified, SNI from `host` or the real server's name)."),
            k("url", "string", "/", "Path requested by http and https checks."),
            k("port", "integer", "the real server's port", "Port checked."),
            k("interval", "duration", "5s", "Time between checks."),
            k("timeout", "duration", "2s", "A check not answered by then fails."),
            k("rise", "integer", "2", "Successes in a row that bring a server up (1..100)."),
            k("fall", "integer", "3", "Failures in a row that take a server down (1..100)."),
            k("expect", "list of strings", "[\"2xx\", \"3xx\"]", "Healthy statuses: classes (\"2xx\") or exact codes (\"200\")."),
            k("host", "string", "the real server's host", "Host header of http and https checks."),
            k("initial_state", "checking | up", "checking", "Before its first check: no traffic (checking), or traffic at once (up)."),
        ],
    },
    Section {
        header: "[virtual_service.esp]",
        also: "[virtual_service.sub_service.esp]",
        doc: "Edge Security Pack: which hosts and directories reach the real servers; refused requests never do.",
        keys: &[
            k("allowed_hosts", "list of strings", "[] (any host)", "Host header values allowed (case-insensitive, port ignored)."),
            k("allowed_directories", "list of globs", "[\"/*\"]", "Glob patterns on the normalised path (`*` any run, `?` one character)."),
            k("excluded_directories", "list of globs", "[]", "Carved out of allowed_directories."),
            k("refusal_status", "integer", "403", "Status of refused requests."),
            k("logging", "table", "all on", "See `[virtual_service.esp.logging]`."),
        ],
    },
    Section {
        header: "[virtual_service.esp.logging]",
        also: "",
        doc: "Which of the three logs this service writes.",
        keys: &[
            k("user_access", "bool", "true", "User access log records."),
            k("security", "bool", "true", "Security log records."),
            k("connection", "bool", "true", "Connection log records."),
        ],
    },
    Section {
        header: "[virtual_service.access]",
        also: "[virtual_service.sub_service.access]",
        doc: "IP access list (IPv4 and IPv6 CIDRs); deny wins. On a service it is checked at accept, before TLS; on a sub-service, per request (403).",
        keys: &[
            k("allow", "list of CIDRs", "[] (everyone)", "Client addresses allowed."),
            k("deny", "list of CIDRs", "[]", "Client addresses refused."),
        ],
    },
    Section {
        header: "[virtual_service.headers]",
        also: "[virtual_service.sub_service.headers] (replacing the service's)",
        doc: "Ordered header rules; values may use ${client_addr}, ${tls_version}, ${sni}, ${service}, ${real_server}.",
        keys: &[
            k("hsts", "string", "none", "Strict-Transport-Security on responses to HTTPS clients."),
            k("request", "list of rules", "[]", "Rules applied to requests sent to real servers."),
            k("response", "list of rules", "[]", "Rules applied to responses sent to clients."),
        ],
    },
    Section {
        header: "rule (in headers.request / headers.response)",
        also: "",
        doc: "Exactly one of set, add, delete. No CR/LF; framing and hop-by-hop headers may not be set.",
        keys: &[
            k("set", "header name", "", "Replace every instance with `value`."),
            k("add", "header name", "", "Append one instance with `value`."),
            k("delete", "header name", "", "Remove every instance."),
            k("value", "string", "", "For set and add."),
        ],
    },
    Section {
        header: "[virtual_service.client_limits]",
        also: "",
        doc: "Per client address limits (LoadMaster's per-client limits), appliance-wide.",
        keys: &[
            k("max_connections", "integer", "0 (none)", "Concurrent connections from one address."),
            k("connections_per_second", "integer", "0 (none)", "New connections per second from one address."),
            k("requests_per_second", "integer", "0 (none)", "Requests per second from one address."),
            k("action", "\"429\" | \"503\" | drop", "429", "What a client over a limit gets (drop: close without a word)."),
        ],
    },
    Section {
        header: "[[virtual_service.sub_service]]",
        also: "",
        doc: "A LoadMaster SubVS: requests whose Host (else SNI) and path match go to its own pool. Matched in order; unmatched requests go to the service's pool.",
        keys: &[
            k("name", "string", "sub<K>", "Name in logs, metrics and the API."),
            k("hosts", "list of strings", "required", "Exact names or `*.domain` wildcards, any case, port ignored."),
            k("paths", "list of strings", "[] (any path)", "Path prefixes; the sub-service matches only requests under one."),
            k("scheduling", "as the service's", "round-robin", "How its real server is chosen."),
            k("persistence", "table", "mode = none", "As `[virtual_service.persistence]`."),
            k("health_check", "table", "none", "As `[virtual_service.health_check]`."),
            k("esp", "table", "the service's", "As `[virtual_service.esp]`."),
            k("access", "table", "everyone", "As `[virtual_service.access]`, per request."),
            k("headers", "table", "the service's", "As `[virtual_service.headers]`."),
            k("real_server", "array of tables", "none", "Its pool: as `[[virtual_service.real_server]]`."),
        ],
    },
];

/// The reference as Markdown (docs/configuration.md).
pub fn markdown() -> String {
    let mut s = String::new();
    s.push_str("# Configuration reference\n\n");
    s.push_str(
        "<!-- Generated by `edgeshard config reference`; a test fails when this file differs. -->\n\n",
    );
    s.push_str(
        "TOML. Every key except those marked *required* may be left out. Durations are written \
`500ms`, `5s`, `20m`, `2h`, `1d` (always in quotes; a number alone, `\"30\"`, is seconds; `200us` for the sub-millisecond \
park knobs); sizes `16KiB`, `1MiB`; paths are relative to the config file. `edgeshard check \
--config FILE` refuses unknown keys and bad values with `file:line: field: problem`. See \
[the guide](guide.md) for how the pieces fit, and `examples/` for complete files.\n\n",
    );
    for sec in SECTIONS {
        s.push_str(&format!("## `{}`\n\n{}\n", sec.header, sec.doc));
        if !sec.also.is_empty() {
            s.push_str(&format!("Also: `{}`.\n", sec.also));
        }
        s.push_str("\n| key | type | default | |\n|---|---|---|---|\n");
        for key in sec.keys {
            s.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                key.name,
                key.ty.replace('|', "\\|"),
                key.default,
                key.doc.replace('|', "\\|")
            ));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::FileConfig;

    /// The fields the parser accepts in a table, read from its refusal of an unknown one
    /// ("unknown field `zz_unknown`, expected one of `a`, `b`").
    fn accepted(toml_text: &str) -> Vec<String> {
        let e = toml::from_str::<FileConfig>(toml_text)
            .err()
            .unwrap_or_else(|| panic!("accepted an unknown key:\n{toml_text}"))
            .to_string();
        let list = e
            .split("expected one of ")
            .nth(1)
            .or_else(|| e.split("expected ").nth(1))
            .unwrap_or_else(|| panic!("no field list in: {e}"));
        let list = list.lines().next().unwrap();
        let mut v: Vec<String> = list
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, f)| f.to_string())
            .collect();
        v.sort();
        v
    }

    fn documented(header: &str) -> Vec<String> {
        let sec = SECTIONS
            .iter()
            .find(|s| s.header == header)
            .unwrap_or_else(|| panic!("no section {header}"));
        let mut v: Vec<String> = sec.keys.iter().map(|k| k.name.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn every_section_documents_exactly_the_keys_the_parser_takes() {
        const VS: &str = "[[virtual_service]]\nlisten = \"127.0.0.1:1\"\n";
        let cases: &[(&str, String)] = &[
            ("[runtime]", "[runtime]\nzz_unknown = 1\n".into()),
            (
                "[[runtime.shard]]",
                "[[runtime.shard]]\nzz_unknown = 1\n".into(),
            ),
            ("[admin]", "[admin]\nzz_unknown = 1\n".into()),
            (
                "[[admin.token]]",
                "[admin]\nlisten = \"x\"\n[[admin.token]]\nzz_unknown = 1\n".into(),
            ),
            (
                "[admin.tls]",
                "[admin]\nlisten = \"x\"\n[admin.tls]\nzz_unknown = 1\n".into(),
            ),
            ("[log]", "[log]\nzz_unknown = 1\n".into()),
            ("[[virtual_service]]", format!("{VS}zz_unknown = 1\n")),
            (
                "[[virtual_service.real_server]]",
                format!("{VS}[[virtual_service.real_server]]\nzz_unknown = 1\n"),
            ),
            (
                "[virtual_service.tls]",
                format!("{VS}[virtual_service.tls]\nzz_unknown = 1\n"),
            ),
            (
                "[virtual_service.reencrypt]",
                format!("{VS}[virtual_service.reencrypt]\nzz_unknown = 1\n"),
            ),
            (
                "[virtual_service.redirect]",
                format!("{VS}[virtual_service.redirect]\nzz_unknown = 1\n"),
            ),
            (
                "[virtual_service.persistence]",
                format!("{VS}[virtual_service.persistence]\nzz_unknown = 1\n"),
            ),
            (
                "[virtual_service.health_check]",
                format!("{VS}[virtual_service.health_check]\nzz_unknown = 1\n"),
            ),
            (
                "[virtual_service.esp]",
                format!("{VS}[virtual_service.esp]\nzz_unknown = 1\n"),
            ),
            (
                "[virtual_service.esp.logging]",
                format!("{VS}[virtual_service.esp.logging]\nzz_unknown = 1\n"),
            ),
            (
                "[virtual_service.access]",
                format!("{VS}[virtual_service.access]\nzz_unknown = 1\n"),
            ),
            (
                "[virtual_service.headers]",
                format!("{VS}[virtual_service.headers]\nzz_unknown = 1\n"),
            ),
            (
                "rule (in headers.request / headers.response)",
                format!("{VS}[virtual_service.headers]\nrequest = [ {{ zz_unknown = 1 }} ]\n"),
            ),
            (
                "[virtual_service.client_limits]",
                format!("{VS}[virtual_service.client_limits]\nzz_unknown = 1\n"),
            ),
            (
                "[virtual_service.pass_through]",
                format!("{VS}[virtual_service.pass_through]\nzz_unknown = 1\n"),
            ),
            (
                "[[virtual_service.sub_service]]",
                format!("{VS}[[virtual_service.sub_service]]\nzz_unknown = 1\n"),
            ),
            ("[[top level]]", "zz_unknown = 1\n".into()),
        ];
        for (header, text) in cases {
            let want = if *header == "[[top level]]" {
                let mut v: Vec<String> = ["runtime", "admin", "log", "virtual_service"]
                    .map(String::from)
                    .to_vec();
                v.sort();
                v
            } else {
                documented(header)
            };
            assert_eq!(accepted(text), want, "section {header}");
        }
        // the sub-service's pool and tables are the service's types
        assert_eq!(
            accepted(&format!(
                "{VS}[[virtual_service.sub_service]]\n[[virtual_service.sub_service.real_server]]\nzz_unknown = 1\n"
            )),
            documented("[[virtual_service.real_server]]")
        );
        // every documented section was checked
        assert_eq!(cases.len() - 1, SECTIONS.len());
    }

    fn default_of(header: &str, key: &str) -> &'static str {
        let sec = SECTIONS.iter().find(|s| s.header == header).unwrap();
        sec.keys.iter().find(|k| k.name == key).unwrap().default
    }

    /// The defaults documented are the ones a config without the key gets.
    #[test]
    fn documented_defaults_are_the_loaded_ones() {
        use crate::config::units::{parse_duration, parse_size};
        use crate::config::Config;
        let c = Config::parse(
            std::path::Path::new("t.toml"),
            "[[virtual_service]]\nlisten = \"127.0.0.1:1\"\n[[virtual_service.real_server]]\naddress = \"127.0.0.1:2\"\n",
        )
        .unwrap();
        let vs = &c.services[0];
        let d = |key: &str| parse_duration(default_of("[[virtual_service]]", key)).unwrap();
        let n = |key: &str| {
            let t = default_of("[[virtual_service]]", key);
            t.split(' ').next().unwrap().parse::<u64>().unwrap()
        };
        assert_eq!(vs.idle_timeout, d("idle_timeout"));
        assert_eq!(vs.connect_timeout, d("connect_timeout"));
        assert_eq!(vs.response_timeout, d("response_timeout"));
        assert_eq!(vs.request_timeout, d("request_timeout"));
        assert_eq!(vs.client_body_timeout, d("client_body_timeout"));
        assert_eq!(vs.upstream_body_timeout, d("upstream_body_timeout"));
        assert_eq!(vs.client_write_timeout, d("client_write_timeout"));
        assert_eq!(vs.tunnel_idle_timeout, d("tunnel_idle_timeout"));
        assert_eq!(vs.pool_idle_timeout, d("pool_idle_timeout"));
        assert_eq!(vs.queue_timeout, d("queue_timeout"));
        assert_eq!(vs.pool_size as u64, n("pool_size"));
        assert_eq!(vs.queue_size as u64, n("queue_size"));
        assert_eq!(vs.retries as u64, n("retries"));
        assert_eq!(vs.passive_fall as u64, n("passive_fall"));
        assert_eq!(vs.max_connections as u64, n("max_connections"));
        let rt = &c.runtime;
        let r = |key: &str| default_of("[runtime]", key);
        assert_eq!(
            rt.drain_timeout,
            parse_duration(r("drain_timeout")).unwrap()
        );
        assert_eq!(
            rt.poll_before_park,
            parse_duration(r("poll_before_park")).unwrap()
        );
        assert_eq!(
            rt.io_memory as u64,
            parse_size(r("io_memory")).unwrap() as u64
        );
        assert_eq!(rt.ring_depth.to_string(), r("ring_depth"));
        assert_eq!(rt.backlog.to_string(), r("backlog"));
        assert_eq!(rt.io_engine, crate::net::Engine::Epoll);
        assert_eq!(r("io_engine"), "epoll");
        assert_eq!(r("io_uring_buffers"), "256");
    }

    #[test]
    fn the_committed_reference_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == markdown(),
            "docs/configuration.md differs from `edgeshard config reference`: run\n  \
             cargo run -- config reference > docs/configuration.md"
        );
    }
}
