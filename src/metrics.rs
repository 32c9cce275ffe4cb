//! Counters and latency histograms, per shard (plain `Cell`s: no atomics on the data path).
//! The admin shard gathers every shard's snapshot over the mesh and merges them for
//! `/metrics` (Prometheus text) and `/status`.

use crate::config::Config;
use hdrhistogram::Histogram;
use std::cell::{Cell, RefCell};
use std::fmt::Write;

/// Latency is recorded in microseconds up to a minute.
const LATENCY_MAX_US: u64 = 60_000_000;
/// Prometheus buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn histogram() -> Histogram<u64> {
    // 2 significant digits: ~1% error, a few KiB per histogram.
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 2)
        .unwrap_or_else(|_| Histogram::new(2).expect("valid sigfig"))
}

#[derive(Default)]
pub struct ServiceCounters {
    pub requests: Cell<u64>,
    /// Responses by status class 1xx..5xx.
    pub responses: [Cell<u64>; 5],
    pub bytes_in: Cell<u64>,
    pub bytes_out: Cell<u64>,
    pub connections_active: Cell<u64>,
    pub connections_total: Cell<u64>,
    pub tls_handshakes: Cell<u64>,
    /// Of those, handshakes that resumed a session (a ticket): the rest were full.
    pub tls_resumed: Cell<u64>,
    pub tls_failures: Cell<u64>,
    /// ESP refusals by `esp::Refusal::ALL` order.
    pub esp_refusals: [Cell<u64>; 5],
    /// Limit refusals by `limits::Limit::ALL` order.
    pub limit_refusals: [Cell<u64>; 5],
    /// Connections or requests refused by an IP access list.
    pub access_refusals: Cell<u64>,
    /// Requests waiting for room under connection limits now.
    pub queued: Cell<u64>,
    /// Of `requests`, those that came as HTTP/2 streams.
    pub h2_requests: Cell<u64>,
    /// HTTP/2 connections accepted (ALPN h2).
    pub h2_connections: Cell<u64>,
    /// HTTP/2 connections closed for abuse, by `proxy::h2::flood::Abuse::ALL` order.
    pub h2_abuse: [Cell<u64>; 10],
    /// HTTP/2 streams the h2 layer reset as malformed requests.
    pub h2_malformed: Cell<u64>,
    /// Response body bytes moved socket to socket by splice (never in user space).
    pub spliced_bytes: Cell<u64>,
}

#[derive(Default)]
pub struct ServerCounters {
    pub requests: Cell<u64>,
    pub responses: [Cell<u64>; 5],
    pub bytes_in: Cell<u64>,
    pub bytes_out: Cell<u64>,
    pub connect_errors: Cell<u64>,
    /// Requests that failed here before any response byte and were tried on another server.
    pub retries: Cell<u64>,
    /// Times passive health took the server out.
    pub passive_downs: Cell<u64>,
}

pub struct ShardMetrics {
    /// By service slot.
    pub services: Vec<ServiceCounters>,
    /// By ServerId.
    pub servers: Vec<ServerCounters>,
    /// By service slot, made at a service's first request.
    latency: Vec<RefCell<Option<Histogram<u64>>>>,
    /// Slots the configuration uses: snapshots carry only these.
    in_use: Cell<(usize, usize)>,
}

impl ServiceCounters {
    /// Back to zero: its slot now holds another service (a reload reused it).
    fn reset(&self) {
        for c in [
            &self.requests,
            &self.bytes_in,
            &self.bytes_out,
            &self.connections_active,
            &self.connections_total,
            &self.tls_handshakes,
            &self.tls_resumed,
            &self.tls_failures,
            &self.access_refusals,
            &self.queued,
            &self.h2_requests,
            &self.h2_connections,
            &self.h2_malformed,
            &self.spliced_bytes,
        ] {
            c.set(0);
        }
        for c in self
            .responses
            .iter()
            .chain(&self.esp_refusals)
            .chain(&self.limit_refusals)
            .chain(&self.h2_abuse)
        {
            c.set(0);
        }
    }
}

impl ServerCounters {
    fn reset(&self) {
        for c in [
            &self.requests,
            &self.bytes_in,
            &self.bytes_out,
            &self.connect_errors,
            &self.retries,
            &self.passive_downs,
        ] {
            c.set(0);
        }
        for c in &self.responses {
            c.set(0);
        }
    }
}

fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get().wrapping_add(n));
}

impl ShardMetrics {
    pub fn new(slots: &crate::config::Slots) -> ShardMetrics {
        ShardMetrics {
            services: (0..slots.services)
                .map(|_| ServiceCounters::default())
                .collect(),
            servers: (0..slots.servers)
                .map(|_| ServerCounters::default())
                .collect(),
            latency: (0..slots.services).map(|_| RefCell::new(None)).collect(),
            in_use: Cell::new((slots.used_services, slots.servers)),
        }
    }

    /// Service slot `slot` now holds another service: its counters start from zero.
    pub fn reset_service(&self, slot: usize) {
        if let Some(c) = self.services.get(slot) {
            c.reset();
        }
        if let Some(h) = self.latency.get(slot) {
            *h.borrow_mut() = None;
        }
    }

    /// Server slot `id` now holds another real server.
    pub fn reset_server(&self, id: usize) {
        if let Some(c) = self.servers.get(id) {
            c.reset();
        }
    }

    /// The configuration uses this many service and server slots.
    pub fn set_in_use(&self, services: usize, servers: usize) {
        self.in_use.set((
            services.min(self.services.len()),
            servers.min(self.servers.len()),
        ));
    }

    /// One finished request of service `vs` (and real server `server`, if it got that far).
    pub fn request(
        &self,
        vs: usize,
        h2: bool,
        server: Option<usize>,
        status: u16,
        (bytes_in, bytes_out): (u64, u64),
        micros: u64,
    ) {
        let class = ((status / 100).clamp(1, 5) - 1) as usize;
        if let Some(s) = self.services.get(vs) {
            bump(&s.requests, 1);
            if h2 {
                bump(&s.h2_requests, 1);
            }
            bump(&s.responses[class], 1);
            bump(&s.bytes_in, bytes_in);
            bump(&s.bytes_out, bytes_out);
        }
        if let Some(r) = server.and_then(|i| self.servers.get(i)) {
            bump(&r.requests, 1);
            bump(&r.responses[class], 1);
            bump(&r.bytes_in, bytes_in);
            bump(&r.bytes_out, bytes_out);
        }
        if let Some(h) = self.latency.get(vs) {
            let _ = h
                .borrow_mut()
                .get_or_insert_with(histogram)
                .record(micros.clamp(1, LATENCY_MAX_US));
        }
    }

    pub fn snapshot(
        &self,
        shard: usize,
        accepted: u64,
        parked: u64,
        log_dropped: [u64; 3],
    ) -> MetricsSnapshot {
        let get = |c: &Cell<u64>| c.get();
        MetricsSnapshot {
            shard,
            accepted,
            parked,
            cpu_seconds: thread_cpu_seconds(),
            log_dropped,
            services: self.services[..self.in_use.get().0]
                .iter()
                .zip(&self.latency)
                .map(|(s, h)| ServiceSnap {
                    requests: s.requests.get(),
                    responses: s.responses.each_ref().map(get),
                    bytes_in: s.bytes_in.get(),
                    bytes_out: s.bytes_out.get(),
                    connections_active: s.connections_active.get(),
                    queued: s.queued.get(),
                    connections_total: s.connections_total.get(),
                    tls_handshakes: s.tls_handshakes.get(),
                    tls_resumed: s.tls_resumed.get(),
                    tls_failures: s.tls_failures.get(),
                    esp_refusals: s.esp_refusals.each_ref().map(get),
                    limit_refusals: s.limit_refusals.each_ref().map(get),
                    access_refusals: s.access_refusals.get(),
                    h2_requests: s.h2_requests.get(),
                    h2_connections: s.h2_connections.get(),
                    h2_abuse: s.h2_abuse.each_ref().map(get),
                    h2_malformed: s.h2_malformed.get(),
                    spliced_bytes: s.spliced_bytes.get(),
                    latency: h.borrow().clone().unwrap_or_else(histogram),
                })
                .collect(),
            servers: self.servers[..self.in_use.get().1]
                .iter()
                .map(|r| ServerSnap {
                    requests: r.requests.get(),
                    responses: r.responses.each_ref().map(get),
                    bytes_in: r.bytes_in.get(),
                    bytes_out: r.bytes_out.get(),
                    connect_errors: r.connect_errors.get(),
                    retries: r.retries.get(),
                    passive_downs: r.passive_downs.get(),
                })
                .collect(),
        }
    }
}

/// CPU time of the calling thread (a shard's busy time, kernel work on its behalf included).
pub fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// One shard's counters, sendable over the mesh.
#[derive(Debug, Clone)]
pub struct MetricsSnapshot {
    pub shard: usize,
    pub accepted: u64,
    /// Idle keep-alive client connections parked (waiting with no task).
    pub parked: u64,
    /// CPU time the shard's thread has used (user + system), seconds.
    pub cpu_seconds: f64,
    pub log_dropped: [u64; 3],
    pub services: Vec<ServiceSnap>,
    pub servers: Vec<ServerSnap>,
}

#[derive(Debug, Clone)]
pub struct ServiceSnap {
    pub requests: u64,
    pub responses: [u64; 5],
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connections_active: u64,
    /// Requests waiting for room under connection limits.
    pub queued: u64,
    pub connections_total: u64,
    pub tls_handshakes: u64,
    pub tls_resumed: u64,
    pub tls_failures: u64,
    pub esp_refusals: [u64; 5],
    pub limit_refusals: [u64; 5],
    pub access_refusals: u64,
    pub h2_requests: u64,
    pub h2_connections: u64,
    pub h2_abuse: [u64; 10],
    pub h2_malformed: u64,
    pub spliced_bytes: u64,
    pub latency: Histogram<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct ServerSnap {
    pub requests: u64,
    pub responses: [u64; 5],
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connect_errors: u64,
    pub retries: u64,
    pub passive_downs: u64,
}

/// Every shard's snapshot, merged.
pub struct Merged {
    pub per_shard: Vec<MetricsSnapshot>,
    pub services: Vec<ServiceSnap>,
    pub servers: Vec<ServerSnap>,
    pub log_dropped: [u64; 3],
}

fn add5(a: &mut [u64; 5], b: &[u64; 5]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

pub fn merge(mut shards: Vec<MetricsSnapshot>) -> Merged {
    shards.sort_by_key(|s| s.shard);
    let mut services: Vec<ServiceSnap> = Vec::new();
    let mut servers: Vec<ServerSnap> = Vec::new();
    let mut log_dropped = [0u64; 3];
    for s in &shards {
        for (i, d) in s.log_dropped.iter().enumerate() {
            log_dropped[i] += d;
        }
        for (i, v) in s.services.iter().enumerate() {
            if services.len() <= i {
                services.push(v.clone());
                continue;
            }
            let m = &mut services[i];
            m.requests += v.requests;
            add5(&mut m.responses, &v.responses);
            m.bytes_in += v.bytes_in;
            m.bytes_out += v.bytes_out;
            m.connections_active += v.connections_active;
            m.queued += v.queued;
            m.connections_total += v.connections_total;
            m.tls_handshakes += v.tls_handshakes;
            m.tls_resumed += v.tls_resumed;
            m.tls_failures += v.tls_failures;
            add5(&mut m.esp_refusals, &v.esp_refusals);
            add5(&mut m.limit_refusals, &v.limit_refusals);
            m.access_refusals += v.access_refusals;
            m.h2_requests += v.h2_requests;
            m.h2_connections += v.h2_connections;
            m.h2_malformed += v.h2_malformed;
            m.spliced_bytes += v.spliced_bytes;
            for (x, y) in m.h2_abuse.iter_mut().zip(&v.h2_abuse) {
                *x += y;
            }
            let _ = m.latency.add(&v.latency);
        }
        for (i, v) in s.servers.iter().enumerate() {
            if servers.len() <= i {
                servers.push(v.clone());
                continue;
            }
            let m = &mut servers[i];
            m.requests += v.requests;
            add5(&mut m.responses, &v.responses);
            m.bytes_in += v.bytes_in;
            m.bytes_out += v.bytes_out;
            m.connect_errors += v.connect_errors;
            m.retries += v.retries;
            m.passive_downs += v.passive_downs;
        }
    }
    Merged {
        per_shard: shards,
        services,
        servers,
        log_dropped,
    }
}

/// Prometheus text exposition of the merged metrics. `health(i)`: 1 up, 0 down, per server;
/// `active(i)`: appliance-wide active upstream connections.
pub fn prometheus(
    cfg: &Config,
    m: &Merged,
    health: impl Fn(usize) -> u8,
    active: impl Fn(usize) -> u32,
) -> String {
    let mut o = String::with_capacity(8192);
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    let classes = ["1xx", "2xx", "3xx", "4xx", "5xx"];

    family(
        &mut o,
        "edgeshard_requests_total",
        "counter",
        "Requests answered, per virtual service and client protocol.",
    );
    for vs in &cfg.services {
        let (all, h2) = m
            .services
            .get(vs.slot)
            .map_or((0, 0), |s| (s.requests, s.h2_requests));
        for (protocol, v) in [("http/1.1", all.saturating_sub(h2)), ("h2", h2)] {
            let _ = writeln!(
                o,
                "edgeshard_requests_total{{service=\"{}\",protocol=\"{protocol}\"}} {v}",
                esc(&vs.name)
            );
        }
    }
    family(
        &mut o,
        "edgeshard_h2_abuse_total",
        "counter",
        "HTTP/2 connections closed for abuse (floods, rapid reset, protocol errors), by kind.",
    );
    for vs in &cfg.services {
        for a in crate::proxy::h2::flood::Abuse::ALL {
            let v = m.services.get(vs.slot).map_or(0, |s| s.h2_abuse[a.index()]);
            let _ = writeln!(
                o,
                "edgeshard_h2_abuse_total{{service=\"{}\",kind=\"{}\"}} {v}",
                esc(&vs.name),
                a.label()
            );
        }
    }
    family(
        &mut o,
        "edgeshard_responses_total",
        "counter",
        "Responses by status class, per virtual service.",
    );
    for vs in &cfg.services {
        let i = vs.slot;
        for (c, class) in classes.iter().enumerate() {
            let v = m.services.get(i).map(|s| s.responses[c]).unwrap_or(0);
            let _ = writeln!(
                o,
                "edgeshard_responses_total{{service=\"{}\",class=\"{class}\"}} {v}",
                esc(&vs.name)
            );
        }
    }
    for (name, help, pick) in [
        (
            "edgeshard_received_bytes_total",
            "Bytes received from clients.",
            0,
        ),
        ("edgeshard_sent_bytes_total", "Bytes sent to clients.", 1),
        (
            "edgeshard_connections_total",
            "Client connections accepted.",
            2,
        ),
        (
            "edgeshard_tls_handshakes_total",
            "Completed TLS handshakes.",
            3,
        ),
        (
            "edgeshard_tls_handshake_failures_total",
            "Failed TLS handshakes.",
            4,
        ),
        (
            "edgeshard_access_refusals_total",
            "Connections and requests refused by an IP access list.",
            5,
        ),
        (
            "edgeshard_tls_resumed_handshakes_total",
            "Completed TLS handshakes that resumed a session (the others were full handshakes).",
            6,
        ),
        (
            "edgeshard_h2_connections_total",
            "HTTP/2 client connections (ALPN h2 or h2c), per virtual service.",
            7,
        ),
        (
            "edgeshard_h2_malformed_streams_total",
            "HTTP/2 requests refused as malformed by the h2 layer (stream reset PROTOCOL_ERROR).",
            8,
        ),
        (
            "edgeshard_spliced_bytes_total",
            "Response body bytes moved from real server to client by splice, never copied to user space.",
            9,
        ),
    ] {
        family(&mut o, name, "counter", help);
        for vs in &cfg.services {
            let i = vs.slot;
            let v = m
                .services
                .get(i)
                .map(|s| {
                    [
                        s.bytes_in,
                        s.bytes_out,
                        s.connections_total,
                        s.tls_handshakes,
                        s.tls_failures,
                        s.access_refusals,
                        s.tls_resumed,
                        s.h2_connections,
                        s.h2_malformed,
                        s.spliced_bytes,
                    ][pick]
                })
                .unwrap_or(0);
            let _ = writeln!(o, "{name}{{service=\"{}\"}} {v}", esc(&vs.name));
        }
    }
    family(
        &mut o,
        "edgeshard_queued_requests",
        "gauge",
        "Requests waiting for room under real servers' connection limits (queue_timeout).",
    );
    for vs in &cfg.services {
        let v = m.services.get(vs.slot).map(|s| s.queued).unwrap_or(0);
        let _ = writeln!(
            o,
            "edgeshard_queued_requests{{service=\"{}\"}} {v}",
            esc(&vs.name)
        );
    }
    family(
        &mut o,
        "edgeshard_connections_active",
        "gauge",
        "Open client connections.",
    );
    for vs in &cfg.services {
        let i = vs.slot;
        let v = m.services.get(i).map(|s| s.connections_active).unwrap_or(0);
        let _ = writeln!(
            o,
            "edgeshard_connections_active{{service=\"{}\"}} {v}",
            esc(&vs.name)
        );
    }
    family(
        &mut o,
        "edgeshard_esp_refusals_total",
        "counter",
        "Requests refused by ESP, by reason.",
    );
    for vs in &cfg.services {
        let i = vs.slot;
        for (r, refusal) in crate::esp::Refusal::ALL.iter().enumerate() {
            let v = m.services.get(i).map(|s| s.esp_refusals[r]).unwrap_or(0);
            let _ = writeln!(
                o,
                "edgeshard_esp_refusals_total{{service=\"{}\",reason=\"{}\"}} {v}",
                esc(&vs.name),
                refusal.label()
            );
        }
    }
    family(
        &mut o,
        "edgeshard_limit_refusals_total",
        "counter",
        "Connections and requests refused by limits, by limit.",
    );
    for vs in &cfg.services {
        let i = vs.slot;
        for (r, limit) in crate::limits::Limit::ALL.iter().enumerate() {
            let v = m.services.get(i).map(|s| s.limit_refusals[r]).unwrap_or(0);
            let _ = writeln!(
                o,
                "edgeshard_limit_refusals_total{{service=\"{}\",limit=\"{}\"}} {v}",
                esc(&vs.name),
                limit.label()
            );
        }
    }
    family(
        &mut o,
        "edgeshard_request_duration_seconds",
        "histogram",
        "Request latency, per virtual service.",
    );
    for vs in &cfg.services {
        let i = vs.slot;
        let Some(s) = m.services.get(i) else { continue };
        let name = esc(&vs.name);
        for b in BUCKETS {
            let upto = (b * 1e6) as u64;
            let count: u64 = s
                .latency
                .iter_recorded()
                .filter(|v| v.value_iterated_to() <= upto)
                .map(|v| v.count_at_value())
                .sum();
            let _ = writeln!(o, "edgeshard_request_duration_seconds_bucket{{service=\"{name}\",le=\"{b}\"}} {count}");
        }
        let total = s.latency.len();
        let sum: f64 = s
            .latency
            .iter_recorded()
            .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
            .sum::<f64>()
            / 1e6;
        let _ = writeln!(
            o,
            "edgeshard_request_duration_seconds_bucket{{service=\"{name}\",le=\"+Inf\"}} {total}"
        );
        let _ = writeln!(
            o,
            "edgeshard_request_duration_seconds_sum{{service=\"{name}\"}} {sum}"
        );
        let _ = writeln!(
            o,
            "edgeshard_request_duration_seconds_count{{service=\"{name}\"}} {total}"
        );
    }

    let rs_label = |i: usize| {
        let rs = &cfg.servers[i];
        let pool = &cfg.pools[rs.pool];
        format!(
            "service=\"{}\",pool=\"{}\",real_server=\"{}\"",
            esc(&cfg.services[pool.service].name),
            esc(&pool.name),
            esc(&rs.name)
        )
    };
    family(
        &mut o,
        "edgeshard_real_server_requests_total",
        "counter",
        "Requests sent to each real server.",
    );
    for i in cfg.live_servers().map(|rs| rs.id.0) {
        let v = m.servers.get(i).map(|s| s.requests).unwrap_or(0);
        let _ = writeln!(
            o,
            "edgeshard_real_server_requests_total{{{}}} {v}",
            rs_label(i)
        );
    }
    family(
        &mut o,
        "edgeshard_real_server_responses_total",
        "counter",
        "Responses from each real server by status class.",
    );
    for i in cfg.live_servers().map(|rs| rs.id.0) {
        for (c, class) in classes.iter().enumerate() {
            let v = m.servers.get(i).map(|s| s.responses[c]).unwrap_or(0);
            let _ = writeln!(
                o,
                "edgeshard_real_server_responses_total{{{},class=\"{class}\"}} {v}",
                rs_label(i)
            );
        }
    }
    for (name, help, pick) in [
        (
            "edgeshard_real_server_received_bytes_total",
            "Bytes received from clients for each real server.",
            0,
        ),
        (
            "edgeshard_real_server_sent_bytes_total",
            "Bytes sent to clients from each real server.",
            1,
        ),
        (
            "edgeshard_real_server_connect_errors_total",
            "Failed connections to each real server.",
            2,
        ),
        (
            "edgeshard_real_server_retries_total",
            "Requests that failed on each real server before any response byte and were tried on another.",
            3,
        ),
        (
            "edgeshard_real_server_passive_downs_total",
            "Times passive health (consecutive connect failures or resets) took each real server out.",
            4,
        ),
    ] {
        family(&mut o, name, "counter", help);
        for i in cfg.live_servers().map(|rs| rs.id.0) {
            let v = m
                .servers
                .get(i)
                .map(|s| {
                    [
                        s.bytes_in,
                        s.bytes_out,
                        s.connect_errors,
                        s.retries,
                        s.passive_downs,
                    ][pick]
                })
                .unwrap_or(0);
            let _ = writeln!(o, "{name}{{{}}} {v}", rs_label(i));
        }
    }
    family(
        &mut o,
        "edgeshard_real_server_up",
        "gauge",
        "1 when the real server is healthy and enabled.",
    );
    for i in cfg.live_servers().map(|rs| rs.id.0) {
        let _ = writeln!(
            o,
            "edgeshard_real_server_up{{{}}} {}",
            rs_label(i),
            health(i)
        );
    }
    family(
        &mut o,
        "edgeshard_real_server_active_connections",
        "gauge",
        "Active upstream connections, appliance-wide.",
    );
    for i in cfg.live_servers().map(|rs| rs.id.0) {
        let _ = writeln!(
            o,
            "edgeshard_real_server_active_connections{{{}}} {}",
            rs_label(i),
            active(i)
        );
    }
    let per_shard = |o: &mut String,
                     name: &str,
                     kind: &str,
                     help: &str,
                     v: &dyn Fn(&MetricsSnapshot) -> u64| {
        family(o, name, kind, help);
        for s in &m.per_shard {
            let _ = writeln!(
                o,
                "{name}{{shard=\"{}\",core=\"{}\"}} {}",
                s.shard,
                cfg.runtime.cores.get(s.shard).copied().unwrap_or(0),
                v(s)
            );
        }
    };
    per_shard(
        &mut o,
        "edgeshard_shard_accepted_connections_total",
        "counter",
        "Client connections accepted per shard (SO_REUSEPORT balance).",
        &|s| s.accepted,
    );
    per_shard(
        &mut o,
        "edgeshard_shard_parked_connections",
        "gauge",
        "Idle keep-alive client connections waiting for their next request with no task.",
        &|s| s.parked,
    );
    family(
        &mut o,
        "edgeshard_shard_cpu_seconds_total",
        "counter",
        "CPU time used by each shard's thread (busy time).",
    );
    for s in &m.per_shard {
        let _ = writeln!(
            o,
            "edgeshard_shard_cpu_seconds_total{{shard=\"{}\"}} {:.6}",
            s.shard, s.cpu_seconds
        );
    }
    family(
        &mut o,
        "edgeshard_log_records_dropped_total",
        "counter",
        "Log records dropped because the writer could not keep up.",
    );
    for k in crate::log::Kind::ALL {
        let _ = writeln!(
            o,
            "edgeshard_log_records_dropped_total{{log=\"{}\"}} {}",
            k.name(),
            m.log_dropped[k as usize]
        );
    }
    let _ = writeln!(
        o,
        "edgeshard_log_records_dropped_total{{log=\"stderr\"}} {}",
        crate::diag::dropped()
    );
    let c = crate::control::counters();
    family(
        &mut o,
        "edgeshard_config_generation",
        "gauge",
        "Configuration generation serving: 1 at start, one more per reload (kept over upgrades).",
    );
    let _ = writeln!(o, "edgeshard_config_generation {}", c.generation);
    family(
        &mut o,
        "edgeshard_config_reloads_total",
        "counter",
        "Configuration reloads (SIGHUP, edgeshard reload, and the runtime API's reloads, server additions and removals), by result: error means the previous configuration still serves.",
    );
    let _ = writeln!(
        o,
        "edgeshard_config_reloads_total{{result=\"ok\"}} {}",
        c.reloads_ok
    );
    let _ = writeln!(
        o,
        "edgeshard_config_reloads_total{{result=\"error\"}} {}",
        c.reloads_error
    );
    family(
        &mut o,
        "edgeshard_ocsp_refreshes_total",
        "counter",
        "OCSP status refreshes of stapled certificates, by result (error: the last good status, if still valid, stays stapled).",
    );
    let _ = writeln!(
        o,
        "edgeshard_ocsp_refreshes_total{{result=\"ok\"}} {}",
        crate::ocsp::REFRESH_OK.load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "edgeshard_ocsp_refreshes_total{{result=\"error\"}} {}",
        crate::ocsp::REFRESH_ERROR.load(std::sync::atomic::Ordering::Relaxed)
    );
    family(
        &mut o,
        "edgeshard_config_last_reload_timestamp_seconds",
        "gauge",
        "When the last reload was tried (0: never).",
    );
    let _ = writeln!(
        o,
        "edgeshard_config_last_reload_timestamp_seconds {:.3}",
        c.last_reload_unix_ms as f64 / 1000.0
    );
    family(
        &mut o,
        "edgeshard_config_last_reload_success",
        "gauge",
        "1 if the last reload (or none yet) succeeded, 0 if it was refused.",
    );
    let _ = writeln!(
        o,
        "edgeshard_config_last_reload_success {}",
        c.last_reload_ok as u8
    );
    family(
        &mut o,
        "edgeshard_upgrades_total",
        "counter",
        "Binary upgrades this appliance has gone through (carried from process to process).",
    );
    let _ = writeln!(o, "edgeshard_upgrades_total {}", c.upgrades);
    o
}
