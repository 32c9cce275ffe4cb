//! The last 15 minutes, in memory, on the admin shard: every `[admin] history_interval` it
//! gathers every shard's counters (as a scrape does) and keeps, per service, per real server
//! and per shard, the rates over that interval. Bounded: `WINDOW / interval` points per
//! series, and a series nobody has fed for a whole window is dropped. `GET /api/v1/history`
//! serves it; the status page draws it.

use crate::metrics::Merged;
use crate::shard::{Shard, State};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How far back the history goes.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);

/// One series: a value per point (None: no data then, e.g. before the service existed).
#[derive(Default)]
struct Series {
    points: VecDeque<Option<f64>>,
    /// The point count when last fed (a series not fed for a window is dropped).
    fed_at: u64,
}

/// Counters at the previous sample, to take rates from.
struct Prev {
    at: Instant,
    /// Per key: services [requests, 5xx, -], servers [requests, 5xx, 5xx + connect errors],
    /// shards [accepted, cpu seconds, -].
    counts: BTreeMap<String, [f64; 3]>,
    latency: BTreeMap<String, Histogram<u64>>,
}

pub struct History {
    interval: Duration,
    capacity: usize,
    /// Points taken so far (the newest has number `taken`).
    taken: u64,
    stamps: VecDeque<u64>,
    /// Keyed "<kind>\u{0}<name>\u{0}<metric>".
    series: BTreeMap<(u8, String, &'static str), Series>,
    prev: Option<Prev>,
    /// `GET /api/v1/history`'s body, made once per point (pages poll it every interval).
    cached: Option<std::rc::Rc<str>>,
}

const SERVICE: u8 = 0;
const SERVER: u8 = 1;
const SHARD: u8 = 2;

impl History {
    pub fn new(interval: Duration) -> History {
        let capacity = (WINDOW.as_secs_f64() / interval.as_secs_f64())
            .ceil()
            .max(2.0) as usize;
        History {
            interval,
            capacity,
            taken: 0,
            stamps: VecDeque::with_capacity(capacity),
            series: BTreeMap::new(),
            prev: None,
            cached: None,
        }
    }

    fn push(&mut self, kind: u8, name: &str, metric: &'static str, v: Option<f64>) {
        let (taken, cap) = (self.taken, self.capacity);
        let s = self
            .series
            .entry((kind, name.to_string(), metric))
            .or_default();
        // the points it missed since it was last fed (all of them for a new series) are gaps
        let missing = taken.saturating_sub(s.fed_at + 1) as usize;
        for _ in 0..missing.min(cap) {
            s.points.push_back(None);
        }
        s.points.push_back(v);
        while s.points.len() > cap {
            s.points.pop_front();
        }
        s.fed_at = taken;
    }

    /// The JSON body, from the cache while no point has been taken since.
    pub fn body(&mut self) -> std::rc::Rc<str> {
        if let Some(c) = &self.cached {
            return c.clone();
        }
        let body: std::rc::Rc<str> = self.to_json().to_string().into();
        self.cached = Some(body.clone());
        body
    }

    /// Take one point from counters merged over every shard.
    pub fn sample(&mut self, shard: &Shard, merged: &Merged, now: Instant, wall_ms: u64) {
        self.cached = None;
        let cfg = &shard.config;
        let mut counts = BTreeMap::new();
        let mut latency = BTreeMap::new();
        for vs in &cfg.services {
            let Some(s) = merged.services.get(vs.slot) else {
                continue;
            };
            counts.insert(
                format!("s{}", vs.name),
                [s.requests as f64, s.responses[4] as f64, 0.0],
            );
            latency.insert(vs.name.clone(), s.latency.clone());
        }
        for pool in &cfg.pools {
            for &id in &pool.servers {
                let Some(s) = merged.servers.get(id.0) else {
                    continue;
                };
                let rs = shard.server(id);
                counts.insert(
                    format!("r{}\u{0}{}", pool.name, rs.name),
                    [
                        s.requests as f64,
                        s.responses[4] as f64,
                        (s.responses[4] + s.connect_errors) as f64,
                    ],
                );
            }
        }
        for snap in &merged.per_shard {
            counts.insert(
                format!("h{}", snap.shard),
                [snap.accepted as f64, snap.cpu_seconds, 0.0],
            );
        }
        let Some(prev) = self.prev.take() else {
            // the first gather only sets the baseline
            self.prev = Some(Prev {
                at: now,
                counts,
                latency,
            });
            return;
        };
        let dt = now.duration_since(prev.at).as_secs_f64().max(1e-3);
        self.taken += 1;
        self.stamps.push_back(wall_ms);
        while self.stamps.len() > self.capacity {
            self.stamps.pop_front();
        }
        // a counter that went back (its slot given to another) has no rate this time
        let rate = |key: &str, i: usize| -> Option<f64> {
            let now = counts.get(key)?[i];
            let before = prev.counts.get(key)?[i];
            (now >= before).then(|| (now - before) / dt)
        };
        for vs in &cfg.services {
            let key = format!("s{}", vs.name);
            let rps = rate(&key, 0);
            let e5 = rate(&key, 1);
            let (mut p50, mut p99) = (None, None);
            if let (Some(cur), Some(old)) = (latency.get(&vs.name), prev.latency.get(&vs.name)) {
                let mut d = cur.clone();
                if d.subtract(old).is_ok() && !d.is_empty() {
                    p50 = Some(d.value_at_quantile(0.5) as f64 / 1000.0);
                    p99 = Some(d.value_at_quantile(0.99) as f64 / 1000.0);
                }
            }
            self.push(SERVICE, &vs.name, "requests_per_second", rps);
            self.push(SERVICE, &vs.name, "errors_5xx_per_second", e5);
            self.push(SERVICE, &vs.name, "p50_ms", p50);
            self.push(SERVICE, &vs.name, "p99_ms", p99);
        }
        for pool in &cfg.pools {
            for &id in &pool.servers {
                let rs = shard.server(id);
                let key = format!("r{}\u{0}{}", pool.name, rs.name);
                let name = format!("{}\u{0}{}", pool.name, rs.name);
                let (r, e) = (rate(&key, 0), rate(&key, 2));
                self.push(SERVER, &name, "requests_per_second", r);
                self.push(SERVER, &name, "errors_per_second", e);
            }
        }
        for snap in &merged.per_shard {
            let key = format!("h{}", snap.shard);
            let (a, busy) = (rate(&key, 0), rate(&key, 1));
            let name = snap.shard.to_string();
            self.push(SHARD, &name, "accepted_per_second", a);
            self.push(SHARD, &name, "busy", busy.map(|b| b.min(1.0)));
        }
        let (taken, cap) = (self.taken, self.capacity as u64);
        self.series.retain(|_, s| taken - s.fed_at < cap);
        self.prev = Some(Prev {
            at: now,
            counts,
            latency,
        });
    }

    /// The history as `GET /api/v1/history` answers it.
    pub fn to_json(&self) -> Value {
        let n = self.stamps.len();
        // every series aligned to the timestamps (older points than a series has: null)
        // a series not fed lately (its service or server left) ends with gaps up to now
        let values = |s: &Series| -> Vec<Value> {
            let stale = (self.taken - s.fed_at) as usize;
            let points = s
                .points
                .iter()
                .map(|v| match v {
                    Some(x) if x.is_finite() => json!((x * 1000.0).round() / 1000.0),
                    _ => Value::Null,
                })
                .chain(std::iter::repeat_n(Value::Null, stale));
            let total = s.points.len() + stale;
            let pad = n.saturating_sub(total);
            std::iter::repeat_n(Value::Null, pad)
                .chain(points.skip(total.saturating_sub(n)))
                .collect()
        };
        let mut services: BTreeMap<&str, serde_json::Map<String, Value>> = BTreeMap::new();
        let mut servers: BTreeMap<&str, serde_json::Map<String, Value>> = BTreeMap::new();
        let mut shards: BTreeMap<usize, serde_json::Map<String, Value>> = BTreeMap::new();
        for ((kind, name, metric), s) in &self.series {
            let m = match *kind {
                SERVICE => services.entry(name).or_insert_with(|| {
                    let mut m = serde_json::Map::new();
                    m.insert("name".into(), json!(name));
                    m
                }),
                SERVER => servers.entry(name).or_insert_with(|| {
                    let (pool, addr) = name.split_once('\u{0}').unwrap_or(("", name));
                    let mut m = serde_json::Map::new();
                    m.insert("pool".into(), json!(pool));
                    m.insert("address".into(), json!(addr));
                    m
                }),
                _ => {
                    let id = name.parse().unwrap_or(0);
                    shards.entry(id).or_insert_with(|| {
                        let mut m = serde_json::Map::new();
                        m.insert("id".into(), json!(id));
                        m
                    })
                }
            };
            m.insert((*metric).into(), Value::Array(values(s)));
        }
        json!({
            "interval_seconds": self.interval.as_secs_f64(),
            "window_seconds": WINDOW.as_secs(),
            "timestamps_ms": self.stamps,
            "services": services.into_values().collect::<Vec<_>>(),
            "real_servers": servers.into_values().collect::<Vec<_>>(),
            "shards": shards.into_values().collect::<Vec<_>>(),
        })
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The admin shard's sampler: one gather per interval, for as long as the shard runs.
pub async fn run(state: Rc<State>) {
    let mut next = Instant::now();
    loop {
        let shard = state.current();
        // a reload may change the resolution: the history starts over at the new one
        let interval = shard
            .config
            .admin
            .as_ref()
            .map_or(Duration::from_secs(5), |a| a.history_interval);
        {
            let mut h = state.history.borrow_mut();
            if h.as_ref().is_none_or(|h| h.interval != interval) {
                *h = Some(History::new(interval));
            }
        }
        next += interval;
        let merged = shard.gather_metrics().await;
        if let Some(h) = state.history.borrow_mut().as_mut() {
            h.sample(&shard, &merged, Instant::now(), unix_ms());
        }
        drop(shard);
        let now = Instant::now();
        // a slow gather (a shard not answering yet) delays the rhythm, never bunches points
        next = next.max(now + interval / 2);
        futures_lite::future::or(glommio::timer::sleep(next - now), async {
            state.closed().await;
        })
        .await;
        if state.is_closing() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(h: &mut History, feed_a: bool) {
        h.taken += 1;
        h.stamps.push_back(h.taken);
        while h.stamps.len() > h.capacity {
            h.stamps.pop_front();
        }
        if feed_a {
            h.push(SERVICE, "a", "requests_per_second", Some(1.0));
        }
        h.push(SERVICE, "b", "requests_per_second", Some(2.0));
    }

    fn series(h: &History, name: &str) -> Vec<Value> {
        let j = h.to_json();
        j["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()["requests_per_second"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// A series that stops being fed shows gaps from then on, also once the window is full,
    /// and comes back after its gap; every series stays aligned to the timestamps.
    #[test]
    fn a_series_that_stops_shows_gaps_not_its_last_value() {
        let mut h = History::new(Duration::from_secs(300)); // 3 points in the window
        for feed in [true, true, true, true, false, false, true] {
            tick(&mut h, feed);
        }
        assert_eq!(h.stamps.len(), 3);
        let a = series(&h, "a");
        assert_eq!(
            a,
            vec![Value::Null, Value::Null, json!(1.0)],
            "gap, gap, back"
        );
        assert_eq!(series(&h, "b"), vec![json!(2.0); 3]);
        tick(&mut h, false);
        tick(&mut h, false);
        assert_eq!(series(&h, "a"), vec![json!(1.0), Value::Null, Value::Null]);
        // a new series starts with gaps before its first point
        let mut h = History::new(Duration::from_secs(300));
        tick(&mut h, false);
        tick(&mut h, true);
        assert_eq!(series(&h, "a"), vec![Value::Null, json!(1.0)]);
    }
}
