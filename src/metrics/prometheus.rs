//! The Prometheus text exposition of the merged metrics (`GET /metrics`).

use super::*;
use std::fmt::Write;

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
