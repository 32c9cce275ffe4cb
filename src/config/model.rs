//! The runtime configuration: plain data every shard shares read-only, produced by one
//! validation step from the file types (`file.rs`) in `mod.rs`. No I/O here.

use super::file::{
    CheckType, ForwardedFor, LimitAction, LogFormat, Mode, PathNormalization, Role, Scheduling,
    Steering,
};
use super::tls;
use crate::access::Access;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Index of a real server across the whole appliance (all virtual services), so shards can
/// exchange per-server counts as one flat array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId(pub usize);

#[derive(Debug, Clone)]
pub struct Config {
    pub runtime: Runtime,
    pub admin: Option<Admin>,
    pub log: LogConfig,
    pub services: Vec<VirtualService>,
    /// Every pool of real servers: each service's own, then its sub-services'.
    pub pools: Vec<Pool>,
    /// Every real server, indexed by `ServerId`.
    pub servers: Vec<RealServer>,
    /// Live real servers (`servers` also holds, after a reload, the ones it removed).
    pub nr_servers: usize,
    /// Room for per-service, per-pool and per-server state, kept across reloads.
    pub slots: Slots,
}

/// Every shard sizes its per-service, per-pool and per-server state (counters, connection
/// counts, persistence tables, the load view) once, for this many: a reload keeps each
/// service, pool and server that stays in its slot, so requests in flight count against
/// the right one, and gives new ones fresh slots (see `reload.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    pub services: usize,
    pub pools: usize,
    pub servers: usize,
    /// Slots handed out so far (the next new service or pool takes the next one).
    pub used_services: usize,
    pub used_pools: usize,
}

impl Slots {
    /// Room for a configuration of this size, and for reloads that add to it.
    pub fn for_size(services: usize, pools: usize, servers: usize) -> Slots {
        Slots {
            services: services + 32,
            pools: pools + 64,
            servers: (servers * 2).max(servers + 256),
            used_services: services,
            used_pools: pools,
        }
    }
}

/// Real servers chosen among together: a virtual service's own, or a sub-service's.
#[derive(Debug, Clone)]
pub struct Pool {
    pub id: usize,
    /// Its place in per-pool state (persistence tables), kept across reloads.
    pub slot: usize,
    /// "service" or "service/sub-service".
    pub name: String,
    /// Index of the owning virtual service.
    pub service: usize,
    pub scheduling: Scheduling,
    pub servers: Vec<ServerId>,
    pub persistence: Persistence,
    pub health_check: Option<HealthCheck>,
    /// The service's slow start: a server back up ramps its weight over this.
    pub slow_start: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Persistence {
    None,
    /// The appliance inserts a signed cookie naming the real server.
    ActiveCookie {
        cookie: String,
        timeout: Duration,
    },
    /// One client address sticks to one real server (connections steered to one shard).
    SourceIp {
        timeout: Duration,
        max_entries: usize,
    },
}

#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub kind: CheckType,
    pub url: String,
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Inclusive status ranges counted as healthy.
    pub expect: Vec<(u16, u16)>,
    pub host: Option<String>,
    /// Traffic before the first check (initial_state = "up"); else none until a good one.
    pub initial_up: bool,
}

/// Per client address limits.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    pub max_connections: u32,
    pub connections_per_second: u32,
    pub requests_per_second: u32,
    pub action: LimitAction,
}

/// Where the three ESP logs go.
#[derive(Debug, Clone, Default)]
pub struct LogConfig {
    pub user_access: Option<LogTarget>,
    pub security: Option<LogTarget>,
    pub connection: Option<LogTarget>,
    pub format: LogFormat,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    File(PathBuf),
}

/// Edge Security Pack rules.
#[derive(Debug, Clone)]
pub struct Esp {
    /// Lower-case host names; empty: any host.
    pub allowed_hosts: Vec<String>,
    pub allowed_directories: Vec<String>,
    pub excluded_directories: Vec<String>,
    pub refusal_status: u16,
}

/// Which ESP logs a virtual service writes (all on by default).
#[derive(Debug, Clone, Copy)]
pub struct EspLogging {
    pub user_access: bool,
    pub security: bool,
    pub connection: bool,
}

impl Default for EspLogging {
    fn default() -> Self {
        EspLogging {
            user_access: true,
            security: true,
            connection: true,
        }
    }
}

/// A LoadMaster SubVS.
#[derive(Debug, Clone)]
pub struct SubService {
    pub name: String,
    /// Lower-case exact names or `*.domain` wildcards.
    pub hosts: Vec<String>,
    pub paths: Vec<String>,
    pub pool: usize,
    /// Its own ESP rules (else the virtual service's).
    pub esp: Option<Esp>,
    /// Who may reach it (checked once a request is routed here).
    pub access: Option<Access>,
    /// Its own header rules (else the virtual service's).
    pub headers: Option<crate::http::rules::HeaderRules>,
}

#[derive(Debug, Clone)]
pub struct Runtime {
    /// CPU of each shard, in shard order.
    pub cores: Vec<usize>,
    pub drain_timeout: Duration,
    pub ring_depth: usize,
    pub io_memory: usize,
    pub spin_before_park: Option<Duration>,
    /// An idle shard's wait for socket events before it parks (zero: park at once).
    pub poll_before_park: Duration,
    /// How the shards drive their sockets.
    pub io_engine: crate::net::Engine,
    pub backlog: u32,
    /// Client connections at once (0: none), enforced per shard as its share.
    pub max_connections: u32,
    /// Signs persistence cookies; None: a random key chosen at start-up.
    pub persistence_key: Option<[u8; 32]>,
    /// `run --pid-file` overrides it.
    pub pid_file: Option<PathBuf>,
    /// Session-ticket masters from `ticket_key_file`, newest last (None: random at start).
    pub ticket_keys: Option<Vec<[u8; 32]>>,
    /// Each shard's settings, in shard order (defaults above, per-core overrides applied).
    pub shards: Vec<ShardSettings>,
}

/// What one shard does and how.
#[derive(Debug, Clone)]
pub struct ShardSettings {
    pub core: usize,
    pub ring_depth: usize,
    pub io_memory: usize,
    pub spin_before_park: Option<Duration>,
    pub poll_before_park: Duration,
    pub backlog: u32,
    /// 0: its share of `runtime.max_connections`.
    pub max_connections: u32,
    /// Indices of the virtual services it serves (all by default).
    pub services: Vec<usize>,
}

impl Runtime {
    /// How many shards serve virtual service `vs`.
    pub fn shards_serving(&self, vs: usize) -> usize {
        self.shards
            .iter()
            .filter(|s| s.services.contains(&vs))
            .count()
    }
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub listen: SocketAddr,
    pub access: Option<Access>,
    pub tokens: Vec<Token>,
    /// /metrics and /healthz need no token.
    pub public_metrics: bool,
    /// Lower-case names accepted in Host besides the listener's own address.
    pub hosts: Vec<String>,
    pub state_file: Option<PathBuf>,
    /// One point of the 15-minute history every this long (1s..60s).
    pub history_interval: Duration,
    /// HTTPS on the admin listener.
    pub tls: Option<Tls>,
}

/// An API token as the appliance keeps it: only its hash.
#[derive(Debug, Clone)]
pub struct Token {
    pub name: String,
    pub role: Role,
    pub sha256: [u8; 32],
}

#[derive(Debug, Clone)]
pub struct VirtualService {
    pub name: String,
    /// HTTP (layer 7) or TCP (layer 4: bytes relayed, no HTTP).
    pub mode: Mode,
    /// tcp services: TLS passed through untouched; with `route_by_sni`, the sub-service is
    /// chosen by the ClientHello's server name.
    pub pass_through: Option<PassThrough>,
    /// The service's `send_proxy` (real servers added at runtime take it).
    pub send_proxy: bool,
    /// Connections from `trusted_proxies` begin with a PROXY header; others are refused.
    pub accept_proxy: bool,
    /// Its place in per-service state (counters, connection counts), kept across reloads.
    pub slot: usize,
    pub listen: SocketAddr,
    /// The service's own pool (used when no sub-service matches).
    pub pool: usize,
    pub sub_services: Vec<SubService>,
    pub shard_steering: Steering,
    pub esp: Option<Esp>,
    pub logging: EspLogging,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub request_timeout: Duration,
    pub pool_size: usize,
    pub pool_idle_timeout: Duration,
    pub client_body_timeout: Duration,
    pub upstream_body_timeout: Duration,
    /// Longest wait for a client to take response bytes (HTTP/2: to open its window).
    pub client_write_timeout: Duration,
    pub tunnel_idle_timeout: Duration,
    /// 0: no limit.
    pub max_body_size: u64,
    /// Client connections at once, appliance-wide (0: no limit; enforced per shard as its share).
    pub max_connections: u32,
    pub client_limits: Option<ClientLimits>,
    /// Wait for room under connection limits (zero: 503 at once).
    pub queue_timeout: Duration,
    /// Requests that may wait for room, per shard.
    pub queue_size: usize,
    pub limits: HeadLimits,
    pub tls: Option<Tls>,
    pub reencrypt: Option<Reencrypt>,
    pub redirect: Option<Redirect>,
    /// Other real servers tried when connecting fails (or an idempotent request got nothing).
    pub retries: u32,
    /// Consecutive connect failures or resets that take a server out (0: never).
    pub passive_fall: u32,
    pub path_normalization: PathNormalization,
    pub forwarded_for: ForwardedFor,
    /// Peers whose forwarding headers are kept (empty: nobody's).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Add an RFC 7239 Forwarded header.
    pub forwarded_header: bool,
    /// Large plain-to-plain response bodies move socket → pipe → socket (splice).
    pub splice_response: bool,
    /// A plain service also takes HTTP/2 by prior knowledge (the client's preface).
    pub h2c: bool,
    /// Who may connect (checked at accept, before TLS).
    pub access: Option<Access>,
    /// Header rules and HSTS (a sub-service's replace them for its requests).
    pub headers: Option<crate::http::rules::HeaderRules>,
}

/// TLS pass-through of a tcp service.
#[derive(Debug, Clone, Copy)]
pub struct PassThrough {
    pub route_by_sni: bool,
}

/// TLS termination for a virtual service.
#[derive(Debug, Clone)]
pub struct Tls {
    /// In config order: the first answers clients without (matching) SNI.
    pub certs: Vec<tls::ServerCert>,
    pub handshake_timeout: Duration,
    /// Protocols offered by ALPN, preferred first (none for a tcp service).
    pub alpn: Vec<Vec<u8>>,
}

/// Re-encryption to real servers.
#[derive(Debug, Clone)]
pub struct Reencrypt {
    /// Trust anchors; None only with `insecure_skip_verify`.
    pub roots: Option<Arc<rustls::RootCertStore>>,
    /// SNI and verified name for every real server; None: each real server's host.
    pub server_name: Option<String>,
    pub insecure_skip_verify: bool,
}

/// Answer every request with a redirect to the same URL over HTTPS.
#[derive(Debug, Clone, Copy)]
pub struct Redirect {
    pub https_port: u16,
    pub status: u16,
}

/// Limits on a request head, enforced by the parser.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub max_header_size: usize,
    pub max_request_line: usize,
    pub max_headers: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        HeadLimits {
            max_header_size: 16 * 1024,
            max_request_line: 8 * 1024,
            max_headers: 100,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RealServer {
    pub id: ServerId,
    /// The pool it belongs to.
    pub pool: usize,
    pub address: SocketAddr,
    /// The address as written, for Host headers and status output.
    pub name: String,
    pub weight: u32,
    /// 0 = unlimited.
    pub connection_limit: u32,
    /// Who it is across reloads: its pool's name and its address as written.
    pub key: String,
    /// Each connection to it starts with a PROXY protocol v2 header.
    pub send_proxy: bool,
    /// Removed by a reload: kept only so that its id still names it for requests that were
    /// in flight on it; in no pool.
    pub retired: bool,
}

/// Hard ceiling on headers per request: the parser keeps them on the stack.
pub const MAX_HEADERS_CEILING: usize = 256;
