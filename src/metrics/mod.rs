//! Counters and latency histograms, per shard (plain `Cell`s: no atomics on the data path).
//! The admin shard gathers every shard's snapshot over the mesh and merges them for
//! `/metrics` (Prometheus text) and `/status`.

use crate::config::Config;
use hdrhistogram::Histogram;
use std::cell::{Cell, RefCell};

mod prometheus;
pub use prometheus::prometheus;

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
