//! The TOML file as written by operators: serde types only, no validation, no I/O.
//! Keys here are a contract with operators' tooling: extend, never rename.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub runtime: Option<FileRuntime>,
    pub admin: Option<FileAdmin>,
    pub log: Option<FileLog>,
    #[serde(default)]
    pub virtual_service: Vec<FileVirtualService>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

/// Where the three ESP logs go: a file path (relative to the config file) or "stdout".
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLog {
    pub user_access: Option<Spanned<String>>,
    pub security: Option<Spanned<String>>,
    pub connection: Option<Spanned<String>>,
    #[serde(default)]
    pub format: LogFormat,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEsp {
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Glob patterns on the normalised path; default everything ("/*").
    pub allowed_directories: Option<Vec<String>>,
    #[serde(default)]
    pub excluded_directories: Vec<String>,
    /// Status for refused requests (default 403).
    pub refusal_status: Option<Spanned<u16>>,
    pub logging: Option<FileEspLogging>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEspLogging {
    pub user_access: Option<bool>,
    pub security: Option<bool>,
    pub connection: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileRuntime {
    /// One shard per listed CPU, pinned.
    pub cores: Option<Spanned<Vec<usize>>>,
    /// Number of shards when `cores` is not given (first N online CPUs).
    pub shards: Option<Spanned<usize>>,
    /// Allow more shards than CPUs (several shards on one CPU): tests and small boxes.
    #[serde(default)]
    pub oversubscribe: bool,
    /// Bounded time in-flight requests get to finish after SIGTERM/SIGINT.
    pub drain_timeout: Option<Spanned<String>>,
    /// Per-shard io_uring settings.
    pub ring_depth: Option<Spanned<usize>>,
    pub io_memory: Option<Spanned<String>>,
    pub spin_before_park: Option<Spanned<String>>,
    /// How long an idle shard waits for socket events before it parks in glommio.
    pub poll_before_park: Option<Spanned<String>>,
    /// "epoll" or "io_uring": how the shards drive their sockets.
    pub io_engine: Option<Spanned<String>>,
    /// io_uring only: provided 16 KiB receive buffers per shard (a power of two).
    pub io_uring_buffers: Option<Spanned<u32>>,
    /// Listener backlog per shard and virtual service.
    pub backlog: Option<Spanned<u32>>,
    /// Client connections the appliance holds at once (0: no limit; each shard takes its share).
    pub max_connections: Option<u32>,
    /// Secret (64 hex digits) that signs persistence cookies; the same on every appliance that
    /// must honour the others' cookies. Default: random at start-up.
    pub persistence_key: Option<Spanned<String>>,
    /// TLS session-ticket master keys (64 hex digits a line, newest last), shared by the
    /// appliances of a pair so a resumed session survives failover. Default: random at start.
    pub ticket_key_file: Option<Spanned<String>>,
    /// Where `run` writes its PID once serving (and a new process after an upgrade); the
    /// outcome of reloads and upgrades goes beside it (`<pid_file>.status`).
    pub pid_file: Option<Spanned<String>>,
    /// Per-core settings: what the shard(s) on that core do and how.
    #[serde(default)]
    pub shard: Vec<FileShard>,
}

/// Overrides for the shard(s) on one core.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileShard {
    pub core: Spanned<usize>,
    pub ring_depth: Option<Spanned<usize>>,
    pub io_memory: Option<Spanned<String>>,
    pub spin_before_park: Option<Spanned<String>>,
    pub poll_before_park: Option<Spanned<String>>,
    pub backlog: Option<u32>,
    /// Client connections this shard holds at once (default: its share of the appliance's).
    pub max_connections: Option<u32>,
    /// Only these virtual services (by name) are served on this core (default: all).
    pub services: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    pub listen: Spanned<String>,
    /// API tokens: without one, only the read-only pages are served.
    #[serde(default)]
    pub token: Vec<FileToken>,
    /// /metrics and /healthz readable without a token (default: true on a loopback listener).
    pub public_metrics: Option<bool>,
    /// Host names the admin listener answers to besides its own address (DNS rebinding).
    pub hosts: Option<Vec<String>>,
    /// Runtime changes (state, weight) written here survive a restart.
    pub state_file: Option<Spanned<String>>,
    /// Resolution of the in-memory history (15 minutes) behind /api/v1/history.
    pub history_interval: Option<Spanned<String>>,
    /// HTTPS on the admin listener: `tls = { cert = "...", key = "..." }`.
    pub tls: Option<FileCertificate>,
    /// Client addresses (CIDR) allowed to reach the admin listener (default: all).
    pub allow: Option<Spanned<Vec<String>>>,
    /// Client addresses refused (deny wins over allow).
    pub deny: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Read,
    Operator,
    Admin,
}

/// One API token: its SHA-256 (hex) in the config, or a file holding the token itself.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileToken {
    pub name: Spanned<String>,
    pub role: Role,
    pub sha256: Option<Spanned<String>>,
    pub token_file: Option<Spanned<String>>,
}

/// An IP access list: CIDR blocks (v4 and v6), deny wins, an empty allow list allows all.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAccess {
    pub allow: Option<Spanned<Vec<String>>>,
    pub deny: Option<Spanned<Vec<String>>>,
}

/// Header rules of a service or sub-service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHeaders {
    /// Strict-Transport-Security on responses to HTTPS clients.
    pub hsts: Option<Spanned<String>>,
    pub request: Option<Spanned<Vec<FileHeaderRule>>>,
    pub response: Option<Spanned<Vec<FileHeaderRule>>>,
}

/// One rule: exactly one of `set`, `add`, `delete` (a field name); `value` for set and add.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHeaderRule {
    pub set: Option<String>,
    pub add: Option<String>,
    pub delete: Option<String>,
    pub value: Option<String>,
}

/// Whether a request path that normalisation changed is forwarded normalised or refused.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PathNormalization {
    #[default]
    Forward,
    Refuse,
}

/// What happens to a client's X-Forwarded-For.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedFor {
    /// The real server sees only the client's address.
    #[default]
    Replace,
    /// Earlier hops are kept (only from `trusted_proxies`, when that is set).
    Append,
}

/// A health-checked server's state before its first check.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum InitialState {
    /// No traffic until the first good check (the checks start at once).
    #[default]
    Checking,
    Up,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduling {
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    LeastConnection,
    WeightedLeastConnection,
}

impl Scheduling {
    /// As the config spells it.
    pub fn name(self) -> &'static str {
        match self {
            Scheduling::RoundRobin => "round-robin",
            Scheduling::WeightedRoundRobin => "weighted-round-robin",
            Scheduling::LeastConnection => "least-connection",
            Scheduling::WeightedLeastConnection => "weighted-least-connection",
        }
    }
}

impl CheckType {
    /// As the config spells it.
    pub fn name(self) -> &'static str {
        match self {
            CheckType::Http => "http",
            CheckType::Https => "https",
            CheckType::Tcp => "tcp",
            CheckType::Tls => "tls",
        }
    }
}

/// What a virtual service speaks: HTTP (layer 7) or bytes relayed as they are (layer 4).
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Http,
    Tcp,
}

/// The PROXY protocol version sent to real servers.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyProtocol {
    V2,
}

/// TLS left untouched by a tcp service: the ClientHello is read, not answered.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePassThrough {
    /// Choose the sub-service by the ClientHello's server name (default true).
    pub route_by_sni: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileVirtualService {
    pub name: Option<String>,
    pub listen: Spanned<String>,
    /// "http" (default) or "tcp": bytes relayed both ways, no HTTP parsing.
    pub mode: Option<Spanned<Mode>>,
    /// tcp services: TLS passed through untouched, routed by SNI.
    pub pass_through: Option<FilePassThrough>,
    /// Send a PROXY protocol header ("v2") to every real server (tcp services).
    pub send_proxy: Option<Spanned<ProxyProtocol>>,
    /// Connections from `trusted_proxies` start with a PROXY header (v1 or v2) naming the
    /// real client; connections from anyone else are refused.
    pub accept_proxy: Option<bool>,
    #[serde(default)]
    pub scheduling: Scheduling,
    /// Client connection idle timeout between requests.
    pub idle_timeout: Option<Spanned<String>>,
    /// Upstream TCP connect timeout.
    pub connect_timeout: Option<Spanned<String>>,
    /// Time a real server has to start answering (and between body reads) before 504.
    pub response_timeout: Option<Spanned<String>>,
    /// Time a client has to send a whole request head once it started one.
    pub request_timeout: Option<Spanned<String>>,
    /// Longest wait for the next piece of a request body.
    pub client_body_timeout: Option<Spanned<String>>,
    /// Longest wait for the next piece of a response body from a real server.
    pub upstream_body_timeout: Option<Spanned<String>>,
    /// Longest wait for a client to take response bytes (or, over HTTP/2, open its window).
    pub client_write_timeout: Option<Spanned<String>>,
    /// A WebSocket (or other upgraded) tunnel idle this long is closed.
    pub tunnel_idle_timeout: Option<Spanned<String>>,
    /// Largest request body accepted (413 beyond); 0 or absent: no limit.
    pub max_body_size: Option<Spanned<String>>,
    /// Client connections this service holds at once, across shards (0: no limit).
    pub max_connections: Option<u32>,
    /// Per client address limits (LoadMaster's per-client limits).
    pub client_limits: Option<FileClientLimits>,
    /// When every real server is at its connection limit: how long a request may wait for
    /// room before 503 (0: answer 503 at once), and how many may wait per shard.
    pub queue_timeout: Option<Spanned<String>>,
    pub queue_size: Option<usize>,
    /// Idle upstream connections kept per real server per shard.
    pub pool_size: Option<usize>,
    /// Other real servers tried when connecting fails (or a request got no answer at all).
    pub retries: Option<Spanned<u32>>,
    /// Consecutive connect failures or resets that take a real server out at once (0: never).
    pub passive_fall: Option<Spanned<u32>>,
    /// A real server that comes back up ramps its weight over this long (0: at once).
    pub slow_start: Option<Spanned<String>>,
    /// A path that normalisation changes ("/%61dmin", "/x/../admin"): forwarded normalised,
    /// or refused with 400.
    pub path_normalization: Option<PathNormalization>,
    /// "replace" (default) or "append" the client's X-Forwarded-For.
    pub forwarded_for: Option<ForwardedFor>,
    /// Peers (CIDR) whose forwarding headers are kept; others' are replaced or dropped.
    pub trusted_proxies: Option<Spanned<Vec<String>>>,
    /// Also send an RFC 7239 Forwarded header (for=, proto=, host=).
    pub forwarded_header: Option<bool>,
    /// Move large plain response bodies by splice(2).
    pub splice_response: Option<bool>,
    /// HTTP/2 without TLS, by prior knowledge, on a plain service.
    pub h2c: Option<bool>,
    /// IP access list, checked at accept (before TLS).
    pub access: Option<FileAccess>,
    /// Header rules on requests and responses, and HSTS.
    pub headers: Option<FileHeaders>,
    /// How long an idle pooled upstream connection may be reused.
    pub pool_idle_timeout: Option<Spanned<String>>,
    /// Largest request head accepted (431 beyond).
    pub max_header_size: Option<Spanned<String>>,
    /// Longest request line accepted (414 beyond).
    pub max_request_line: Option<Spanned<String>>,
    /// Most header fields in a request (431 beyond).
    pub max_headers: Option<Spanned<usize>>,
    /// TLS termination: present means the service speaks HTTPS to clients.
    pub tls: Option<FileTls>,
    /// Re-encryption: present means real servers are reached over TLS.
    pub reencrypt: Option<FileReencrypt>,
    /// Present means every request is answered with a redirect to the HTTPS URL.
    pub redirect: Option<FileRedirect>,
    /// Which shard gets a connection: "kernel" (SO_REUSEPORT hash) or "source-ip" (a reuseport
    /// BPF program keeps every connection of one client address on one shard). Source-IP
    /// persistence implies "source-ip".
    pub shard_steering: Option<Steering>,
    pub persistence: Option<FilePersistence>,
    pub health_check: Option<FileHealthCheck>,
    /// Edge Security Pack: allowed hosts and directories, and which logs this service writes.
    pub esp: Option<FileEsp>,
    #[serde(default)]
    pub sub_service: Vec<FileSubService>,
    #[serde(default)]
    pub real_server: Vec<FileRealServer>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Steering {
    #[default]
    Kernel,
    SourceIp,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PersistenceMode {
    #[default]
    None,
    ActiveCookie,
    SourceIp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePersistence {
    #[serde(default)]
    pub mode: PersistenceMode,
    pub cookie: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    /// Most source-IP entries kept per shard.
    pub max_entries: Option<usize>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum CheckType {
    Http,
    Https,
    Tcp,
    /// A TLS handshake, nothing sent after it (TLS real servers of tcp services).
    Tls,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHealthCheck {
    /// Default: "https" when the service re-encrypts, else "http".
    #[serde(rename = "type")]
    pub kind: Option<CheckType>,
    pub url: Option<Spanned<String>>,
    pub port: Option<u16>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub rise: Option<Spanned<u32>>,
    pub fall: Option<Spanned<u32>>,
    /// Status codes counted as healthy: "2xx", "3xx" or exact codes like "200".
    pub expect: Option<Spanned<Vec<String>>>,
    /// Host header sent with HTTP checks (default: the real server's host).
    pub host: Option<String>,
    /// "checking" (default): no traffic before the first good check; "up": traffic at once.
    pub initial_state: Option<InitialState>,
}

/// A LoadMaster SubVS: requests whose Host/SNI (and path) match go to its own real servers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSubService {
    pub name: Option<String>,
    /// Exact host names or `*.domain` wildcards, matched case-insensitively without the port.
    pub hosts: Option<Spanned<Vec<String>>>,
    /// Optional path prefixes; the sub-service matches only requests under one of them.
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub scheduling: Scheduling,
    pub persistence: Option<FilePersistence>,
    pub health_check: Option<FileHealthCheck>,
    /// ESP rules of this sub-service (default: the virtual service's).
    pub esp: Option<FileEsp>,
    /// IP access list of this sub-service (403 for requests routed here from others).
    pub access: Option<FileAccess>,
    /// Header rules of this sub-service (default: the virtual service's).
    pub headers: Option<FileHeaders>,
    #[serde(default)]
    pub real_server: Vec<FileRealServer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    /// The first certificate answers clients that send no SNI (or an unknown name).
    pub certificates: Spanned<Vec<FileCertificate>>,
    pub handshake_timeout: Option<Spanned<String>>,
    /// Offer HTTP/2 by ALPN (default true; HTTP services only).
    pub http2: Option<bool>,
    /// Staple each certificate's OCSP status (from its AIA responder, or its file).
    pub ocsp_stapling: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCertificate {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    /// A DER OCSP response for this certificate, fetched by the operator (implies stapling).
    pub ocsp_response_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileReencrypt {
    /// PEM trust anchors for the real servers' certificates.
    pub ca: Option<Spanned<String>>,
    /// SNI and name to verify; default: each real server's host.
    pub server_name: Option<Spanned<String>>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRedirect {
    /// Port of the HTTPS service (omitted from the URL when 443).
    pub https_port: Option<u16>,
    /// 301, 302, 307 or 308.
    pub status: Option<Spanned<u16>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRealServer {
    pub address: Spanned<String>,
    /// A PROXY protocol header to this server (default: the service's `send_proxy`).
    pub send_proxy: Option<Spanned<ProxyProtocol>>,
    pub weight: Option<Spanned<u32>>,
    #[serde(default)]
    pub connection_limit: u32,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LimitAction {
    /// Answer 429 Too Many Requests (then close).
    #[default]
    #[serde(rename = "429")]
    TooManyRequests,
    /// Answer 503 Service Unavailable (then close).
    #[serde(rename = "503")]
    Unavailable,
    /// Close the connection without a word.
    Drop,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileClientLimits {
    /// Concurrent connections from one address (0: none).
    #[serde(default)]
    pub max_connections: u32,
    /// New connections per second from one address (0: none).
    #[serde(default)]
    pub connections_per_second: u32,
    /// Requests per second from one address (0: none).
    #[serde(default)]
    pub requests_per_second: u32,
    #[serde(default)]
    pub action: LimitAction,
}
