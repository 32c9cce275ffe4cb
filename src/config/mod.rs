//! Configuration: the TOML file types (`file`), one validation step (here) into the runtime
//! `Config` (`model`) shared read-only by every shard. The only place that reads files or resolves
//! names; nothing here runs once shards have started.

mod file;
mod model;
pub mod reference;
mod reload;
mod runtime;
pub mod tls;
mod units;

pub use model::*;
pub use reload::{AddedServer, Busy, RemovedServer, RuntimeServers};

pub use crate::access::Access;
use file::*;
pub use file::{
    CheckType, ForwardedFor, LimitAction, LogFormat, Mode, PathNormalization, Role, Scheduling,
    Steering,
};
pub use runtime::online_cpus;
pub use units::{parse_duration, parse_size};

use std::collections::HashSet;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

/// A configuration error that names the file, the line and the field.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}: ", self.file.display(), self.line)?;
        } else {
            write!(f, "{}: ", self.file.display())?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The file types one pool is validated from.
struct PoolSpec<'a> {
    mode: Mode,
    /// The service's send_proxy (a real server's own setting wins).
    send_proxy: bool,
    scheduling: Scheduling,
    slow_start: Duration,
    persistence: &'a Option<FilePersistence>,
    health_check: &'a Option<FileHealthCheck>,
    real_server: &'a [FileRealServer],
}

impl Config {
    /// What two appliances of a pair or an ECMP group must agree on for their choices to be
    /// the same (pools, methods, persistence, servers and weights, the persistence and ticket
    /// keys), hashed: `check` prints it so the appliances' configs can be compared.
    pub fn fingerprint(&self) -> String {
        let mut text = String::new();
        for p in &self.pools {
            text.push_str(&format!(
                "pool {} {:?} {:?}\n",
                p.name, p.scheduling, p.persistence
            ));
            for &id in &p.servers {
                let rs = &self.servers[id.0];
                text.push_str(&format!(
                    "  {} {} {}\n",
                    rs.name, rs.weight, rs.connection_limit
                ));
            }
        }
        if let Some(k) = &self.runtime.persistence_key {
            text.push_str("persistence key ");
            text.extend(crate::access::sha256(k).iter().map(|b| format!("{b:02x}")));
            text.push('\n');
        }
        for k in self.runtime.ticket_keys.iter().flatten() {
            text.push_str("ticket key ");
            text.extend(crate::access::sha256(k).iter().map(|b| format!("{b:02x}")));
            text.push('\n');
        }
        crate::access::sha256(text.as_bytes())[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// What is valid but probably not meant: `check` prints these, `run` logs them.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if let Some(a) = &self.admin {
            if !a.listen.ip().is_loopback() && a.tls.is_none() {
                w.push(format!(
                    "admin.listen: {} is not a loopback address and the admin listener has no TLS: tokens and changes cross the network in clear; set [admin] tls = {{ cert, key }}, or listen on 127.0.0.1",
                    a.listen
                ));
            }
        }
        for vs in &self.services {
            let servers: usize = std::iter::once(vs.pool)
                .chain(vs.sub_services.iter().map(|s| s.pool))
                .map(|p| self.pools[p].servers.len())
                .sum();
            if servers == 0 && vs.redirect.is_none() {
                w.push(format!(
                    "virtual service {:?} has no real server: every request gets 503",
                    vs.name
                ));
            }
        }
        let cookies = self
            .pools
            .iter()
            .any(|p| matches!(p.persistence, Persistence::ActiveCookie { .. }));
        if cookies && self.runtime.persistence_key.is_none() {
            w.push("runtime.persistence_key: not set, so persistence cookies are signed with a key chosen at each start: they do not survive a restart nor work across appliances".into());
        }
        w
    }

    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            field: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(path, &text)
    }

    /// Parse and validate config text; `path` only names the source in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let v = Validator { path, text };
        let file: FileConfig = toml::from_str(text).map_err(|e| v.toml_error(&e))?;
        v.validate(file)
    }
}

struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Validator<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn err(&self, span: Option<Range<usize>>, field: &str, message: String) -> ConfigError {
        ConfigError {
            file: self.path.to_path_buf(),
            line: span.map(|s| self.line_of(s.start)).unwrap_or(0),
            field: field.to_string(),
            message,
        }
    }

    /// Turn a serde/toml error into one naming the field: the key on the error's line, under
    /// the table in force there, with array-of-tables indices as validation errors print them.
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let span = e.span();
        let field = span
            .as_ref()
            .map(|s| field_at_line(self.text, self.line_of(s.start)))
            .unwrap_or_default();
        self.err(span, &field, e.message().to_string())
    }

    fn duration(
        &self,
        v: &Option<Spanned<String>>,
        field: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => match parse_duration(s.get_ref()) {
                Ok(d) if !d.is_zero() => Ok(d),
                Ok(_) => Err(self.err(Some(s.span()), field, "must be greater than 0".into())),
                Err(m) => Err(self.err(Some(s.span()), field, m)),
            },
        }
    }

    fn size(
        &self,
        v: &Option<Spanned<String>>,
        field: &str,
        default: usize,
    ) -> Result<usize, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => parse_size(s.get_ref()).map_err(|m| self.err(Some(s.span()), field, m)),
        }
    }

    fn socket_addr(&self, v: &Spanned<String>, field: &str) -> Result<SocketAddr, ConfigError> {
        let s = v.get_ref();
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(a);
        }
        // host:port names are resolved here, once, before any shard starts.
        match s.to_socket_addrs() {
            Ok(mut it) => it.next().ok_or_else(|| {
                self.err(
                    Some(v.span()),
                    field,
                    format!("{s:?} resolves to no address"),
                )
            }),
            Err(e) => Err(self.err(
                Some(v.span()),
                field,
                format!("invalid address {s:?} (expected host:port): {e}"),
            )),
        }
    }

    fn validate(&self, file: FileConfig) -> Result<Config, ConfigError> {
        let file_runtime = file.runtime.unwrap_or_default();
        let mut runtime = self.runtime(&file_runtime)?;
        let admin = match &file.admin {
            Some(a) => Some(self.admin(a)?),
            None => None,
        };
        let mut listeners: HashSet<SocketAddr> = HashSet::new();
        if let Some(a) = &admin {
            listeners.insert(a.listen);
        }
        if file.virtual_service.is_empty() {
            return Err(self.err(
                None,
                "virtual_service",
                "no [[virtual_service]] defined: nothing to serve".into(),
            ));
        }
        let mut services = Vec::new();
        let mut names = HashSet::new();
        let mut pools = Vec::new();
        let mut servers = Vec::new();
        for (i, vs) in file.virtual_service.iter().enumerate() {
            let p = format!("virtual_service[{i}]");
            if vs.splice_response == Some(true)
                && matches!(runtime.io_engine, crate::net::Engine::IoUring { .. })
            {
                // bytes arrive in the ring's buffers, not the socket: nothing left to splice
                return Err(self.err(
                    file_runtime.io_engine.as_ref().map(|e| e.span()),
                    &format!("{p}.splice_response"),
                    "splice needs runtime.io_engine = \"epoll\" (io_uring receives into its own buffers)".into(),
                ));
            }
            let listen = self.socket_addr(&vs.listen, &format!("{p}.listen"))?;
            if !listeners.insert(listen) || overlaps(&listeners, listen) {
                return Err(self.err(
                    Some(vs.listen.span()),
                    &format!("{p}.listen"),
                    format!("duplicate listener {listen}: another service or admin already listens there"),
                ));
            }
            let name = vs.name.clone().unwrap_or_else(|| format!("vs{i}"));
            if name.is_empty() || name.contains(['/', ' ']) {
                // "service/sub" names a sub-service's pool (in the API, metrics and history)
                return Err(self.err(
                    Some(vs.listen.span()),
                    &format!("{p}.name"),
                    format!("{name:?}: a service name has no '/' or space (\"service/sub\" names a sub-service)"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(self.err(
                    Some(vs.listen.span()),
                    &format!("{p}.name"),
                    format!("duplicate virtual service name {name:?}"),
                ));
            }
            let max_headers = match &vs.max_headers {
                None => HeadLimits::default().max_headers,
                Some(n) if *n.get_ref() >= 1 && *n.get_ref() <= MAX_HEADERS_CEILING => *n.get_ref(),
                Some(n) => {
                    return Err(self.err(
                        Some(n.span()),
                        &format!("{p}.max_headers"),
                        format!("must be between 1 and {MAX_HEADERS_CEILING}"),
                    ))
                }
            };
            let limits = HeadLimits {
                max_header_size: self.size(
                    &vs.max_header_size,
                    &format!("{p}.max_header_size"),
                    HeadLimits::default().max_header_size,
                )?,
                max_request_line: self.size(
                    &vs.max_request_line,
                    &format!("{p}.max_request_line"),
                    HeadLimits::default().max_request_line,
                )?,
                max_headers,
            };
            if limits.max_header_size < 1024 || limits.max_header_size > 1024 * 1024 {
                return Err(self.err(
                    vs.max_header_size.as_ref().map(|s| s.span()),
                    &format!("{p}.max_header_size"),
                    "must be between 1KiB and 1MiB".into(),
                ));
            }
            if limits.max_request_line < 64 || limits.max_request_line > limits.max_header_size {
                return Err(self.err(
                    vs.max_request_line.as_ref().map(|s| s.span()),
                    &format!("{p}.max_request_line"),
                    "must be at least 64 bytes and no more than max_header_size".into(),
                ));
            }
            let tls = match &vs.tls {
                None => None,
                Some(t) => Some(self.tls(t, &p)?),
            };
            let reencrypt = match &vs.reencrypt {
                None => None,
                Some(r) => Some(self.reencrypt(r, &p)?),
            };
            let redirect = match &vs.redirect {
                None => None,
                Some(r) => {
                    let status = match &r.status {
                        None => 301,
                        Some(s) if [301, 302, 307, 308].contains(s.get_ref()) => *s.get_ref(),
                        Some(s) => {
                            return Err(self.err(
                                Some(s.span()),
                                &format!("{p}.redirect.status"),
                                "must be 301, 302, 307 or 308".into(),
                            ))
                        }
                    };
                    Some(Redirect {
                        https_port: r.https_port.unwrap_or(443),
                        status,
                    })
                }
            };
            let mode = vs.mode.as_ref().map(|m| *m.get_ref()).unwrap_or_default();
            let pass_through = vs.pass_through.as_ref().map(|t| PassThrough {
                route_by_sni: t.route_by_sni.unwrap_or(true),
            });
            let send_proxy = vs.send_proxy.is_some();
            self.check_mode(vs, mode, &p)?;
            let mut tls = tls;
            if let (Some(t), Mode::Tcp) = (tls.as_mut(), mode) {
                // bytes relayed as they are: no application protocol to announce
                t.alpn.clear();
            }
            let reencrypting = reencrypt.is_some();
            let vs_idx = services.len();
            // "0s" turns slow start off
            let slow_start = match &vs.slow_start {
                None => Duration::ZERO,
                Some(v) => parse_duration(v.get_ref())
                    .map_err(|m| self.err(Some(v.span()), &format!("{p}.slow_start"), m))?,
            };
            let own = PoolSpec {
                mode,
                send_proxy,
                slow_start,
                scheduling: vs.scheduling,
                persistence: &vs.persistence,
                health_check: &vs.health_check,
                real_server: &vs.real_server,
            };
            let pool = self.pool(
                &mut pools,
                &mut servers,
                vs_idx,
                name.clone(),
                &p,
                own,
                reencrypting,
            )?;
            let mut sub_services = Vec::new();
            for (k, sub) in vs.sub_service.iter().enumerate() {
                let sp = format!("{p}.sub_service[{k}]");
                let sub_name = sub.name.clone().unwrap_or_else(|| format!("sub{k}"));
                let clash = vs.sub_service[..k]
                    .iter()
                    .enumerate()
                    .any(|(j, o)| o.name.clone().unwrap_or_else(|| format!("sub{j}")) == sub_name);
                if sub_name.is_empty() || sub_name.contains(['/', ' ']) || clash {
                    return Err(self.err(
                        None,
                        &format!("{sp}.name"),
                        format!("{sub_name:?}: sub-service names are unique in their service, with no '/' or space"),
                    ));
                }
                let hosts: Vec<String> = match &sub.hosts {
                    Some(h) => {
                        for host in h.get_ref() {
                            let bare = host.strip_prefix("*.").unwrap_or(host);
                            if bare.is_empty() || bare.contains(['*', ':', '/', ' ']) {
                                return Err(self.err(
                                    Some(h.span()),
                                    &format!("{sp}.hosts"),
                                    format!("{host:?}: expected a host name or *.domain"),
                                ));
                            }
                        }
                        h.get_ref().iter().map(|h| h.to_ascii_lowercase()).collect()
                    }
                    None => Vec::new(),
                };
                for path in &sub.paths {
                    if !path.starts_with('/') {
                        return Err(self.err(
                            None,
                            &format!("{sp}.paths"),
                            format!("{path:?} must start with /"),
                        ));
                    }
                }
                if hosts.is_empty() && sub.paths.is_empty() {
                    return Err(self.err(
                        None,
                        &format!("{sp}.hosts"),
                        "a sub-service needs hosts or paths to match".into(),
                    ));
                }
                let spec = PoolSpec {
                    mode,
                    send_proxy,
                    slow_start,
                    scheduling: sub.scheduling,
                    persistence: &sub.persistence,
                    health_check: &sub.health_check,
                    real_server: &sub.real_server,
                };
                let pool = self.pool(
                    &mut pools,
                    &mut servers,
                    vs_idx,
                    format!("{name}/{sub_name}"),
                    &sp,
                    spec,
                    reencrypting,
                )?;
                let sub_esp = match &sub.esp {
                    Some(e) => Some(self.esp(e, &format!("{sp}.esp"))?),
                    None => None,
                };
                let access = match &sub.access {
                    Some(a) => self.access(&a.allow, &a.deny, &format!("{sp}.access"))?,
                    None => None,
                };
                let headers = match &sub.headers {
                    Some(h) => Some(self.headers(h, &format!("{sp}.headers"))?),
                    None => None,
                };
                sub_services.push(SubService {
                    headers,
                    access,
                    esp: sub_esp,
                    name: sub_name,
                    hosts,
                    paths: sub.paths.clone(),
                    pool,
                });
            }
            let source_ip = std::iter::once(pool)
                .chain(sub_services.iter().map(|s| s.pool))
                .any(|p| matches!(pools[p].persistence, Persistence::SourceIp { .. }));
            // Per-client limits are counted on the client's one shard.
            let source_ip = source_ip || vs.client_limits.is_some();
            let shard_steering = if source_ip {
                Steering::SourceIp
            } else {
                vs.shard_steering.unwrap_or_default()
            };
            let esp = match &vs.esp {
                Some(e) => Some(self.esp(e, &format!("{p}.esp"))?),
                None => None,
            };
            let logging = match vs.esp.as_ref().and_then(|e| e.logging.as_ref()) {
                None => EspLogging::default(),
                Some(l) => EspLogging {
                    user_access: l.user_access.unwrap_or(true),
                    security: l.security.unwrap_or(true),
                    connection: l.connection.unwrap_or(true),
                },
            };
            let count = |v: &Option<Spanned<u32>>, f: &str, d: u32, max: u32| match v {
                None => Ok(d),
                Some(n) if *n.get_ref() <= max => Ok(*n.get_ref()),
                Some(n) => Err(self.err(
                    Some(n.span()),
                    &format!("{p}.{f}"),
                    format!("must be between 0 and {max}"),
                )),
            };
            let trusted_proxies = match &vs.trusted_proxies {
                None => Vec::new(),
                Some(list) => self.cidr_list(list, &format!("{p}.trusted_proxies"))?,
            };
            let access = match &vs.access {
                Some(a) => self.access(&a.allow, &a.deny, &format!("{p}.access"))?,
                None => None,
            };
            let headers = match &vs.headers {
                Some(h) => Some(self.headers(h, &format!("{p}.headers"))?),
                None => None,
            };
            let accept_proxy = vs.accept_proxy.unwrap_or(false);
            if accept_proxy && trusted_proxies.is_empty() {
                return Err(self.err(
                    Some(vs.listen.span()),
                    &format!("{p}.accept_proxy"),
                    "a PROXY header is believed only from trusted_proxies: list the load balancers or relays in front (CIDR)".into(),
                ));
            }
            services.push(VirtualService {
                mode,
                pass_through,
                send_proxy,
                accept_proxy,
                slot: services.len(),
                headers,
                retries: count(&vs.retries, "retries", 2, 10)?,
                passive_fall: count(&vs.passive_fall, "passive_fall", 3, 100)?,
                path_normalization: vs.path_normalization.unwrap_or_default(),
                forwarded_for: vs.forwarded_for.unwrap_or_default(),
                trusted_proxies,
                forwarded_header: vs.forwarded_header.unwrap_or(false),
                splice_response: vs.splice_response.unwrap_or(false),
                h2c: vs.h2c.unwrap_or(false),
                access,
                esp,
                logging,
                pool,
                sub_services,
                shard_steering,
                tls,
                reencrypt,
                redirect,
                name,
                listen,
                idle_timeout: self.duration(
                    &vs.idle_timeout,
                    &format!("{p}.idle_timeout"),
                    Duration::from_secs(1800),
                )?,
                connect_timeout: self.duration(
                    &vs.connect_timeout,
                    &format!("{p}.connect_timeout"),
                    Duration::from_secs(5),
                )?,
                response_timeout: self.duration(
                    &vs.response_timeout,
                    &format!("{p}.response_timeout"),
                    Duration::from_secs(60),
                )?,
                request_timeout: self.duration(
                    &vs.request_timeout,
                    &format!("{p}.request_timeout"),
                    Duration::from_secs(30),
                )?,
                pool_size: vs.pool_size.unwrap_or(64),
                queue_timeout: match &vs.queue_timeout {
                    None => Duration::ZERO,
                    Some(q) => parse_duration(q.get_ref())
                        .map_err(|m| self.err(Some(q.span()), &format!("{p}.queue_timeout"), m))?,
                },
                queue_size: vs.queue_size.unwrap_or(128),
                client_body_timeout: self.duration(
                    &vs.client_body_timeout,
                    &format!("{p}.client_body_timeout"),
                    Duration::from_secs(30),
                )?,
                upstream_body_timeout: self.duration(
                    &vs.upstream_body_timeout,
                    &format!("{p}.upstream_body_timeout"),
                    Duration::from_secs(60),
                )?,
                client_write_timeout: self.duration(
                    &vs.client_write_timeout,
                    &format!("{p}.client_write_timeout"),
                    Duration::from_secs(60),
                )?,
                tunnel_idle_timeout: self.duration(
                    &vs.tunnel_idle_timeout,
                    &format!("{p}.tunnel_idle_timeout"),
                    Duration::from_secs(1800),
                )?,
                max_body_size: match &vs.max_body_size {
                    None => 0,
                    Some(_) => {
                        self.size(&vs.max_body_size, &format!("{p}.max_body_size"), 0)? as u64
                    }
                },
                max_connections: vs.max_connections.unwrap_or(0),
                client_limits: vs.client_limits.as_ref().map(|c| ClientLimits {
                    max_connections: c.max_connections,
                    connections_per_second: c.connections_per_second,
                    requests_per_second: c.requests_per_second,
                    action: c.action,
                }),
                pool_idle_timeout: self.duration(
                    &vs.pool_idle_timeout,
                    &format!("{p}.pool_idle_timeout"),
                    Duration::from_secs(30),
                )?,
                limits,
            });
        }
        runtime.shards = self.shards(&file_runtime, &runtime, &services)?;
        let log = match &file.log {
            None => LogConfig::default(),
            Some(l) => LogConfig {
                user_access: self.log_target(&l.user_access, "log.user_access")?,
                security: self.log_target(&l.security, "log.security")?,
                connection: self.log_target(&l.connection, "log.connection")?,
                format: l.format,
            },
        };
        Ok(Config {
            log,
            runtime,
            admin,
            nr_servers: servers.len(),
            slots: Slots::for_size(services.len(), pools.len(), servers.len()),
            services,
            pools,
            servers,
        })
    }

    /// Validate one pool of real servers (a service's own, or a sub-service's) and add it and
    /// its servers to the appliance-wide lists.
    /// What a tcp service cannot have (it never reads HTTP), and what pass-through excludes.
    fn check_mode(&self, vs: &FileVirtualService, mode: Mode, p: &str) -> Result<(), ConfigError> {
        let span = vs.mode.as_ref().map(|m| m.span());
        let refuse = |field: &str, why: &str| {
            Err(self.err(span.clone(), &format!("{p}.{field}"), why.into()))
        };
        if mode == Mode::Http {
            if vs.pass_through.is_some() {
                return refuse("pass_through", "TLS pass-through needs mode = \"tcp\"");
            }
            if vs.h2c == Some(true) && vs.tls.is_some() {
                return refuse(
                    "h2c",
                    "h2c is HTTP/2 without TLS; a TLS service offers HTTP/2 by ALPN ([virtual_service.tls] http2)",
                );
            }
            if let Some(s) = &vs.send_proxy {
                return Err(self.err(Some(s.span()), &format!("{p}.send_proxy"), "the PROXY protocol to real servers needs mode = \"tcp\" (HTTP real servers learn the client from X-Forwarded-For)".into()));
            }
            for (j, rs) in vs.real_server.iter().enumerate() {
                if let Some(s) = &rs.send_proxy {
                    return Err(self.err(
                        Some(s.span()),
                        &format!("{p}.real_server[{j}].send_proxy"),
                        "the PROXY protocol to real servers needs mode = \"tcp\"".into(),
                    ));
                }
            }
            return Ok(());
        }
        let http_only = [
            ("esp", vs.esp.is_some()),
            ("redirect", vs.redirect.is_some()),
            ("headers", vs.headers.is_some()),
            ("max_body_size", vs.max_body_size.is_some()),
            ("path_normalization", vs.path_normalization.is_some()),
            ("forwarded_for", vs.forwarded_for.is_some()),
            ("forwarded_header", vs.forwarded_header.is_some()),
            ("splice_response", vs.splice_response.is_some()),
            ("h2c", vs.h2c.is_some()),
            ("queue_timeout", vs.queue_timeout.is_some()),
            ("queue_size", vs.queue_size.is_some()),
            ("response_timeout", vs.response_timeout.is_some()),
            ("client_body_timeout", vs.client_body_timeout.is_some()),
            ("upstream_body_timeout", vs.upstream_body_timeout.is_some()),
            ("client_write_timeout", vs.client_write_timeout.is_some()),
            ("tunnel_idle_timeout", vs.tunnel_idle_timeout.is_some()),
            ("max_headers", vs.max_headers.is_some()),
            ("max_header_size", vs.max_header_size.is_some()),
            ("max_request_line", vs.max_request_line.is_some()),
            ("pool_size", vs.pool_size.is_some()),
            ("pool_idle_timeout", vs.pool_idle_timeout.is_some()),
        ];
        for (field, set) in http_only {
            if set {
                return refuse(
                    field,
                    "an HTTP setting: a mode = \"tcp\" service relays bytes and reads no HTTP",
                );
            }
        }
        let cookie = |fp: &Option<FilePersistence>| {
            fp.as_ref()
                .is_some_and(|f| f.mode == PersistenceMode::ActiveCookie)
        };
        if cookie(&vs.persistence) {
            return refuse(
                "persistence.mode",
                "a cookie needs HTTP: use \"source-ip\" persistence for a tcp service",
            );
        }
        for (k, sub) in vs.sub_service.iter().enumerate() {
            let sp = format!("sub_service[{k}]");
            if !sub.paths.is_empty() {
                return refuse(
                    &format!("{sp}.paths"),
                    "a tcp service sees no paths: its sub-services match by server name (SNI) only",
                );
            }
            if sub.esp.is_some() || sub.headers.is_some() {
                return refuse(
                    &sp,
                    "esp and headers are HTTP settings: a mode = \"tcp\" service reads no HTTP",
                );
            }
            if cookie(&sub.persistence) {
                return refuse(
                    &format!("{sp}.persistence.mode"),
                    "a cookie needs HTTP: use \"source-ip\" persistence for a tcp service",
                );
            }
        }
        if vs.pass_through.is_some() {
            if vs.tls.is_some() {
                return refuse("pass_through", "pass-through leaves TLS to the real servers: remove [virtual_service.tls] (or pass_through, to terminate TLS here)");
            }
            if vs.reencrypt.is_some() {
                return refuse("pass_through", "pass-through forwards the client's TLS as it is: remove [virtual_service.reencrypt]");
            }
        } else if !vs.sub_service.is_empty() && vs.tls.is_none() {
            return refuse("sub_service", "a plain tcp service has no server name to match: sub-services need pass_through or [virtual_service.tls]");
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn pool(
        &self,
        pools: &mut Vec<Pool>,
        servers: &mut Vec<RealServer>,
        service: usize,
        name: String,
        p: &str,
        spec: PoolSpec<'_>,
        reencrypting: bool,
    ) -> Result<usize, ConfigError> {
        let id = pools.len();
        let mut ids = Vec::new();
        let mut seen = HashSet::new();
        for (j, rs) in spec.real_server.iter().enumerate() {
            let rp = format!("{p}.real_server[{j}]");
            let address = self.socket_addr(&rs.address, &format!("{rp}.address"))?;
            if !seen.insert(address) {
                return Err(self.err(
                    Some(rs.address.span()),
                    &format!("{rp}.address"),
                    format!("real server {address} listed twice in this pool"),
                ));
            }
            let weight = match &rs.weight {
                None => 1000,
                Some(w) if *w.get_ref() >= 1 && *w.get_ref() <= 65535 => *w.get_ref(),
                Some(w) => {
                    return Err(self.err(
                        Some(w.span()),
                        &format!("{rp}.weight"),
                        "must be between 1 and 65535".into(),
                    ))
                }
            };
            let sid = ServerId(servers.len());
            servers.push(RealServer {
                id: sid,
                pool: id,
                address,
                name: rs.address.get_ref().clone(),
                weight,
                connection_limit: rs.connection_limit,
                key: format!("{name} {}", rs.address.get_ref()),
                retired: false,
                send_proxy: spec.send_proxy || rs.send_proxy.is_some(),
            });
            ids.push(sid);
        }
        let persistence = match spec.persistence {
            None => Persistence::None,
            Some(fp) => self.persistence(fp, &format!("{p}.persistence"))?,
        };
        let health_check = match spec.health_check {
            None => None,
            Some(h) => {
                Some(self.health_check(h, &format!("{p}.health_check"), reencrypting, spec.mode)?)
            }
        };
        pools.push(Pool {
            id,
            slot: id,
            name,
            service,
            scheduling: spec.scheduling,
            servers: ids,
            persistence,
            health_check,
            slow_start: spec.slow_start,
        });
        Ok(id)
    }

    fn admin(&self, a: &FileAdmin) -> Result<Admin, ConfigError> {
        let listen = self.socket_addr(&a.listen, "admin.listen")?;
        let mut tokens = Vec::new();
        for (i, t) in a.token.iter().enumerate() {
            let p = format!("admin.token[{i}]");
            let sha256 = match (&t.sha256, &t.token_file) {
                (Some(h), None) => parse_key(h.get_ref()).ok_or_else(|| {
                    self.err(
                        Some(h.span()),
                        &format!("{p}.sha256"),
                        "expected 64 hex digits (edgeshard token new prints them)".into(),
                    )
                })?,
                (None, Some(f)) => {
                    let field = format!("{p}.token_file");
                    let text = self.secret_file(f, &field)?;
                    let err = |m: String| self.err(Some(f.span()), &field, m);
                    let token = text.trim();
                    if token.lines().count() > 1 {
                        return Err(err(
                            "the file holds more than one line: one token a file".into()
                        ));
                    }
                    if token.len() < 16 {
                        return Err(err("the token is shorter than 16 characters".into()));
                    }
                    crate::access::sha256(token.as_bytes())
                }
                _ => {
                    return Err(self.err(
                        Some(t.name.span()),
                        &p,
                        "give exactly one of sha256 and token_file".into(),
                    ))
                }
            };
            let name = t.name.get_ref().clone();
            if tokens.iter().any(|x: &Token| x.name == name) {
                return Err(self.err(
                    Some(t.name.span()),
                    &format!("{p}.name"),
                    format!("duplicate token name {name:?}"),
                ));
            }
            tokens.push(Token {
                name,
                role: t.role,
                sha256,
            });
        }
        Ok(Admin {
            listen,
            access: self.access(&a.allow, &a.deny, "admin")?,
            tokens,
            public_metrics: a.public_metrics.unwrap_or(listen.ip().is_loopback()),
            hosts: a
                .hosts
                .iter()
                .flatten()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            state_file: a.state_file.as_ref().map(|f| self.path(f.get_ref())),
            history_interval: match self.duration(
                &a.history_interval,
                "admin.history_interval",
                Duration::from_secs(5),
            )? {
                d if d >= Duration::from_secs(1) && d <= Duration::from_secs(60) => d,
                _ => {
                    return Err(self.err(
                        a.history_interval.as_ref().map(|s| s.span()),
                        "admin.history_interval",
                        "must be between 1s and 60s".into(),
                    ))
                }
            },
            tls: match &a.tls {
                None => None,
                Some(c) if c.ocsp_response_file.is_some() => {
                    return Err(self.err(
                        c.ocsp_response_file.as_ref().map(|x| x.span()),
                        "admin.tls.ocsp_response_file",
                        "OCSP stapling is for virtual services' certificates".into(),
                    ))
                }
                Some(c) => Some(Tls {
                    certs: vec![self.server_cert(c, "admin.tls")?],
                    handshake_timeout: Duration::from_secs(5),
                    alpn: vec![b"http/1.1".to_vec()],
                }),
            },
        })
    }

    /// Header rules, each checked (names, values, variables), with the field named on error.
    fn headers(
        &self,
        h: &FileHeaders,
        p: &str,
    ) -> Result<crate::http::rules::HeaderRules, ConfigError> {
        use crate::http::rules::{parse_rule, parse_value, HeaderRules, Op};
        let list = |rules: &Option<Spanned<Vec<FileHeaderRule>>>, side: &str| {
            let Some(rules) = rules else {
                return Ok(Vec::new());
            };
            rules
                .get_ref()
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let field = format!("{p}.{side}[{i}]");
                    let err = |m: String| self.err(Some(rules.span()), &field, m);
                    let (op, name) = match (&r.set, &r.add, &r.delete) {
                        (Some(n), None, None) => (Op::Set, n),
                        (None, Some(n), None) => (Op::Add, n),
                        (None, None, Some(n)) => (Op::Delete, n),
                        _ => return Err(err("give exactly one of set, add and delete".into())),
                    };
                    parse_rule(op, name, r.value.as_deref()).map_err(err)
                })
                .collect::<Result<Vec<_>, ConfigError>>()
        };
        let hsts = match &h.hsts {
            None => None,
            Some(v) => {
                parse_value(v.get_ref())
                    .map_err(|m| self.err(Some(v.span()), &format!("{p}.hsts"), m))?;
                if v.get_ref().contains("${") {
                    return Err(self.err(
                        Some(v.span()),
                        &format!("{p}.hsts"),
                        "a fixed value, like \"max-age=31536000; includeSubDomains\"".into(),
                    ));
                }
                Some(v.get_ref().clone())
            }
        };
        Ok(HeaderRules {
            hsts,
            request: list(&h.request, "request")?,
            response: list(&h.response, "response")?,
        })
    }

    /// A file holding a secret (a token, ticket keys): read, once its mode shows nobody but its
    /// owner may read it.
    fn secret_file(&self, f: &Spanned<String>, field: &str) -> Result<String, ConfigError> {
        let path = self.path(f.get_ref());
        let err = |m: String| self.err(Some(f.span()), field, m);
        let meta = std::fs::metadata(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077 != 0 {
            return Err(err(format!(
                "{} is readable by others: chmod 600 it",
                path.display()
            )));
        }
        std::fs::read_to_string(&path).map_err(|e| err(format!("{}: {e}", path.display())))
    }

    /// CIDR blocks (or bare addresses), each checked.
    fn cidr_list(
        &self,
        list: &Spanned<Vec<String>>,
        field: &str,
    ) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        list.get_ref()
            .iter()
            .map(|c| {
                crate::access::parse_cidr(c).map_err(|m| self.err(Some(list.span()), field, m))
            })
            .collect()
    }

    /// An access list from its allow and deny keys (None when neither is given).
    fn access(
        &self,
        allow: &Option<Spanned<Vec<String>>>,
        deny: &Option<Spanned<Vec<String>>>,
        p: &str,
    ) -> Result<Option<Access>, ConfigError> {
        if allow.is_none() && deny.is_none() {
            return Ok(None);
        }
        let list = |v: &Option<Spanned<Vec<String>>>, f: &str| match v {
            None => Ok(Vec::new()),
            Some(l) => self.cidr_list(l, &format!("{p}.{f}")),
        };
        Ok(Some(Access {
            allow: list(allow, "allow")?,
            deny: list(deny, "deny")?,
        }))
    }

    fn log_target(
        &self,
        v: &Option<Spanned<String>>,
        field: &str,
    ) -> Result<Option<LogTarget>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        if v.get_ref() == "stdout" {
            return Ok(Some(LogTarget::Stdout));
        }
        let path = self.path(v.get_ref());
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            return Err(self.err(
                Some(v.span()),
                field,
                format!("directory {} does not exist", dir.display()),
            ));
        }
        Ok(Some(LogTarget::File(path)))
    }

    fn esp(&self, e: &FileEsp, p: &str) -> Result<Esp, ConfigError> {
        let status = match &e.refusal_status {
            None => 403,
            Some(s) if (400..=599).contains(s.get_ref()) => *s.get_ref(),
            Some(s) => {
                return Err(self.err(
                    Some(s.span()),
                    &format!("{p}.refusal_status"),
                    "must be a 4xx or 5xx status".into(),
                ))
            }
        };
        for d in e
            .allowed_directories
            .iter()
            .flatten()
            .chain(&e.excluded_directories)
        {
            if !(d.starts_with('/') || d.starts_with('*')) {
                return Err(self.err(
                    None,
                    &format!("{p}.allowed_directories"),
                    format!("{d:?} must start with / or *"),
                ));
            }
        }
        Ok(Esp {
            allowed_hosts: e
                .allowed_hosts
                .iter()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            allowed_directories: e
                .allowed_directories
                .clone()
                .unwrap_or_else(|| vec!["/*".to_string()]),
            excluded_directories: e.excluded_directories.clone(),
            refusal_status: status,
        })
    }

    fn persistence(&self, fp: &FilePersistence, p: &str) -> Result<Persistence, ConfigError> {
        let timeout = self.duration(
            &fp.timeout,
            &format!("{p}.timeout"),
            Duration::from_secs(20 * 60),
        )?;
        Ok(match fp.mode {
            PersistenceMode::None => Persistence::None,
            PersistenceMode::ActiveCookie => {
                let cookie = match &fp.cookie {
                    None => "EDGESHARD".to_string(),
                    Some(c) => {
                        let ok = !c.get_ref().is_empty()
                            && c.get_ref().bytes().all(|b| {
                                b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
                            });
                        if !ok {
                            return Err(self.err(
                                Some(c.span()),
                                &format!("{p}.cookie"),
                                format!("{:?} is not a valid cookie name", c.get_ref()),
                            ));
                        }
                        c.get_ref().clone()
                    }
                };
                Persistence::ActiveCookie { cookie, timeout }
            }
            PersistenceMode::SourceIp => Persistence::SourceIp {
                timeout,
                max_entries: fp.max_entries.unwrap_or(100_000).max(1),
            },
        })
    }

    fn health_check(
        &self,
        h: &FileHealthCheck,
        p: &str,
        reencrypting: bool,
        mode: Mode,
    ) -> Result<HealthCheck, ConfigError> {
        let kind = h.kind.unwrap_or(if mode == Mode::Tcp {
            CheckType::Tcp
        } else if reencrypting {
            CheckType::Https
        } else {
            CheckType::Http
        });
        if kind == CheckType::Https && !reencrypting {
            return Err(self.err(
                None,
                &format!("{p}.type"),
                "https checks use the service's [reencrypt] settings: configure re-encryption"
                    .into(),
            ));
        }
        let url = match &h.url {
            None => "/".to_string(),
            Some(u) if u.get_ref().starts_with('/') && !u.get_ref().contains([' ', '\r', '\n']) => {
                u.get_ref().clone()
            }
            Some(u) => {
                return Err(self.err(
                    Some(u.span()),
                    &format!("{p}.url"),
                    "must be a path starting with /".into(),
                ))
            }
        };
        let interval = self.duration(
            &h.interval,
            &format!("{p}.interval"),
            Duration::from_secs(5),
        )?;
        let timeout = self.duration(&h.timeout, &format!("{p}.timeout"), Duration::from_secs(2))?;
        let count = |v: &Option<Spanned<u32>>, f: &str, d: u32| -> Result<u32, ConfigError> {
            match v {
                None => Ok(d),
                Some(n) if (1..=100).contains(n.get_ref()) => Ok(*n.get_ref()),
                Some(n) => Err(self.err(
                    Some(n.span()),
                    &format!("{p}.{f}"),
                    "must be between 1 and 100".into(),
                )),
            }
        };
        let mut expect = Vec::new();
        match &h.expect {
            None => expect.extend([(200, 299), (300, 399)]),
            Some(list) => {
                for e in list.get_ref() {
                    let range = match e.as_bytes() {
                        [d @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => {
                            let base = (*d - b'0') as u16 * 100;
                            (base, base + 99)
                        }
                        _ => match e.parse::<u16>() {
                            Ok(c) if (100..=599).contains(&c) => (c, c),
                            _ => {
                                return Err(self.err(
                                    Some(list.span()),
                                    &format!("{p}.expect"),
                                    format!("{e:?}: expected a status code like \"200\" or a class like \"2xx\""),
                                ))
                            }
                        },
                    };
                    expect.push(range);
                }
            }
        }
        Ok(HealthCheck {
            kind,
            url,
            port: h.port,
            interval,
            timeout,
            rise: count(&h.rise, "rise", 2)?,
            fall: count(&h.fall, "fall", 3)?,
            expect,
            host: h.host.clone(),
            initial_up: h.initial_state == Some(InitialState::Up),
        })
    }

    /// Paths in the config are relative to the config file's directory.
    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }

    /// One certificate and its key, loaded and checked; `f` names the field.
    fn server_cert(&self, c: &FileCertificate, f: &str) -> Result<tls::ServerCert, ConfigError> {
        let loaded =
            tls::load_server_cert(&self.path(c.cert.get_ref()), &self.path(c.key.get_ref()));
        match loaded {
            Ok(sc) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                if sc.not_after < now {
                    tracing::warn!(cert = %c.cert.get_ref(), "certificate has expired; clients will refuse it");
                }
                Ok(sc)
            }
            Err((true, m)) => Err(self.err(Some(c.key.span()), &format!("{f}.key"), m)),
            Err((false, m)) => Err(self.err(Some(c.cert.span()), &format!("{f}.cert"), m)),
        }
    }

    fn tls(&self, t: &FileTls, p: &str) -> Result<Tls, ConfigError> {
        if t.certificates.get_ref().is_empty() {
            return Err(self.err(
                Some(t.certificates.span()),
                &format!("{p}.tls.certificates"),
                "at least one certificate is needed".into(),
            ));
        }
        let mut certs = Vec::new();
        let stapling = t.ocsp_stapling.unwrap_or(false);
        for (k, c) in t.certificates.get_ref().iter().enumerate() {
            let f = format!("{p}.tls.certificates[{k}]");
            let mut sc = self.server_cert(c, &f)?;
            let file = c
                .ocsp_response_file
                .as_ref()
                .map(|x| self.path(x.get_ref()));
            if stapling || file.is_some() {
                let span = c
                    .ocsp_response_file
                    .as_ref()
                    .map(|x| x.span())
                    .unwrap_or(c.cert.span());
                let field = if file.is_some() {
                    format!("{f}.ocsp_response_file")
                } else {
                    format!("{p}.tls.ocsp_stapling")
                };
                let stapled =
                    crate::ocsp::register(c.cert.get_ref(), &sc.key, file).map_err(|m| {
                        self.err(Some(span), &field, format!("{}: {m}", c.cert.get_ref()))
                    })?;
                sc.stapled = Some(stapled);
            }
            certs.push(sc);
        }
        Ok(Tls {
            certs,
            handshake_timeout: self.duration(
                &t.handshake_timeout,
                &format!("{p}.tls.handshake_timeout"),
                Duration::from_secs(10),
            )?,
            alpn: if t.http2.unwrap_or(true) {
                vec![b"h2".to_vec(), b"http/1.1".to_vec()]
            } else {
                vec![b"http/1.1".to_vec()]
            },
        })
    }

    fn reencrypt(&self, r: &FileReencrypt, p: &str) -> Result<Reencrypt, ConfigError> {
        let roots = match &r.ca {
            Some(ca) => Some(Arc::new(
                tls::load_roots(&self.path(ca.get_ref()))
                    .map_err(|m| self.err(Some(ca.span()), &format!("{p}.reencrypt.ca"), m))?,
            )),
            None if r.insecure_skip_verify => None,
            None => {
                return Err(self.err(
                    None,
                    &format!("{p}.reencrypt.ca"),
                    "real servers' certificates need a CA to verify against (or insecure_skip_verify = true)".into(),
                ))
            }
        };
        if let Some(n) = &r.server_name {
            if rustls_pki_types::ServerName::try_from(n.get_ref().as_str()).is_err() {
                return Err(self.err(
                    Some(n.span()),
                    &format!("{p}.reencrypt.server_name"),
                    format!("{:?} is not a valid DNS name or IP address", n.get_ref()),
                ));
            }
        }
        Ok(Reencrypt {
            roots,
            server_name: r.server_name.as_ref().map(|n| n.get_ref().clone()),
            insecure_skip_verify: r.insecure_skip_verify,
        })
    }
}

/// The field path at `line_no` (1-based): e.g. `virtual_service[1].real_server[0].weight`.
fn field_at_line(text: &str, line_no: usize) -> String {
    use std::collections::HashMap;
    // times each array-of-tables path has opened so far
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut table = String::new();
    let mut key = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(inner) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let path = inner.trim().to_string();
            let prefix = format!("{path}.");
            counts.retain(|k, _| !k.starts_with(&prefix));
            *counts.entry(path.clone()).or_insert(0) += 1;
            table = path;
        } else if let Some(inner) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = inner.trim().to_string();
        }
        if i + 1 == line_no {
            if !t.starts_with('[') {
                if let Some((k, _)) = t.split_once('=') {
                    key = k.trim().to_string();
                }
            }
            break;
        }
    }
    let mut out = String::new();
    let mut path = String::new();
    for seg in table.split('.').filter(|s| !s.is_empty()) {
        if !path.is_empty() {
            path.push('.');
            out.push('.');
        }
        path.push_str(seg);
        out.push_str(seg);
        if let Some(n) = counts.get(&path) {
            out.push_str(&format!("[{}]", n - 1));
        }
    }
    match (out.is_empty(), key.is_empty()) {
        (true, _) => key,
        (false, true) => out,
        (false, false) => format!("{out}.{key}"),
    }
}

fn parse_key(hex: &str) -> Option<[u8; 32]> {
    let b = hex.trim().as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        key[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(key)
}

/// A wildcard listener (0.0.0.0:p or [::]:p) collides with any other listener on port p.
fn overlaps(listeners: &HashSet<SocketAddr>, new: SocketAddr) -> bool {
    listeners.iter().any(|l| {
        *l != new
            && l.port() == new.port()
            && l.is_ipv4() == new.is_ipv4()
            && (l.ip().is_unspecified() || new.ip().is_unspecified())
    })
}

#[cfg(test)]
mod tests {
    use super::field_at_line;

    #[test]
    fn field_paths_carry_array_indices() {
        let t = "[runtime]\ncores = [0]\n[[virtual_service]]\nlisten = \"a\"\n[[virtual_service.real_server]]\naddress = \"x\"\n[[virtual_service]]\nlisten = \"b\"\n[[virtual_service.real_server]]\nweight = \"w\"\n";
        assert_eq!(field_at_line(t, 2), "runtime.cores");
        assert_eq!(
            field_at_line(t, 6),
            "virtual_service[0].real_server[0].address"
        );
        assert_eq!(field_at_line(t, 8), "virtual_service[1].listen");
        assert_eq!(
            field_at_line(t, 10),
            "virtual_service[1].real_server[0].weight"
        );
        assert_eq!(field_at_line(t, 9), "virtual_service[1].real_server[0]");
    }
}
