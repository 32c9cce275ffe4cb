//! Choosing the real server for a request: the scheduling methods over the appliance-wide
//! view (load, health, operator state), honouring connection limits, and persistence. Pure
//! logic over `LoadView` with time passed in; no I/O.

pub mod load;
pub mod persist;

pub use load::{AdminState, Health, Lease, LoadView, Snapshot};

use crate::config::{Pool, RealServer, Scheduling, ServerId};
use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

struct Candidate {
    id: ServerId,
    limit: u32,
    /// Stable hash of the server's address as configured: the rendezvous hash's server half.
    name_hash: u64,
    /// Round-robin credit of a server in slow start (it takes a turn per whole credit).
    credit: Cell<f64>,
}

/// Per-shard scheduler state for one pool.
pub struct Scheduler {
    method: Scheduling,
    servers: Vec<Candidate>,
    /// A server that comes back up ramps from a small share to its full weight over this.
    slow_start: Duration,
    /// Round-robin cursor.
    next: Cell<usize>,
    /// Smooth weighted round-robin current weights.
    current: RefCell<Vec<i64>>,
}

/// FNV-1a over `data`, then a SplitMix64 finaliser: the same on every build and appliance
/// (std's hasher is neither guaranteed stable nor keyed the same everywhere).
pub fn stable_hash(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key a client address hashes to for rendezvous choices.
pub fn client_key(ip: std::net::IpAddr) -> u64 {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => stable_hash(&v4.octets()),
        std::net::IpAddr::V6(v6) => stable_hash(&v6.octets()),
    }
}

/// Slow start never ramps below this share of a server's weight.
const MIN_RAMP: f64 = 0.01;

impl Scheduler {
    /// `shard` offsets the round-robin start so shards do not all begin on the same server.
    pub fn new(pool: &Pool, servers: &[RealServer], shard: usize) -> Scheduler {
        let servers: Vec<Candidate> = pool
            .servers
            .iter()
            .map(|id| {
                let r = &servers[id.0];
                Candidate {
                    id: r.id,
                    limit: r.connection_limit,
                    name_hash: stable_hash(r.name.as_bytes()),
                    credit: Cell::new(0.0),
                }
            })
            .collect();
        let n = servers.len().max(1);
        Scheduler {
            method: pool.scheduling,
            current: RefCell::new(vec![0; servers.len()]),
            servers,
            slow_start: pool.slow_start,
            next: Cell::new(shard % n),
        }
    }

    /// May `c` take a request: healthy (or, with `fallback`, not yet checked), enabled, below
    /// its limit, and not already tried for this request.
    fn available(
        &self,
        c: &Candidate,
        view: &LoadView,
        exclude: &[ServerId],
        fallback: bool,
    ) -> bool {
        let healthy = if fallback {
            view.fallback(c.id)
        } else {
            view.usable(c.id)
        };
        healthy && !exclude.contains(&c.id) && view.admits(c.id, c.limit)
    }

    /// Share of its weight a server gets now: below 1 while it ramps after coming back up.
    fn ramp(&self, c: &Candidate, view: &LoadView, now: Instant) -> f64 {
        if self.slow_start.is_zero() {
            return 1.0;
        }
        match view.up_since(c.id) {
            Some(t) => {
                let f =
                    now.saturating_duration_since(t).as_secs_f64() / self.slow_start.as_secs_f64();
                f.clamp(MIN_RAMP, 1.0)
            }
            None => 1.0,
        }
    }

    /// Does `c` take its turn now? Always, unless it ramps (slow start): then once per
    /// whole credit, a credit growing by its current share each time it is considered.
    fn takes_turn(&self, c: &Candidate, view: &LoadView, now: Instant) -> bool {
        let r = self.ramp(c, view, now);
        if r >= 1.0 {
            return true;
        }
        let credit = c.credit.get() + r;
        if credit < 1.0 {
            c.credit.set(credit);
            return false;
        }
        c.credit.set(credit - 1.0);
        true
    }

    /// May `id`, a client's persisted choice, take this request: up, ready or draining (a
    /// drained server keeps its persisted clients), below its limit?
    pub fn accepts(&self, id: ServerId, view: &LoadView) -> bool {
        self.servers
            .iter()
            .any(|c| c.id == id && view.keeps_persisted(c.id) && view.admits(c.id, c.limit))
    }

    /// Would a server take the request once this shard's pending admission is acknowledged?
    pub fn awaiting_ack(&self, view: &LoadView) -> bool {
        self.servers
            .iter()
            .any(|c| view.usable(c.id) && view.awaiting_ack(c.id, c.limit))
    }

    /// Does any server of this pool take new connections (health and operator state only)?
    pub fn any_usable(&self, view: &LoadView) -> bool {
        self.servers.iter().any(|c| view.usable(c.id))
    }

    /// The real server for a client `key` (`client_key`) by weighted rendezvous hashing: the
    /// highest `-weight / ln(u)` where `u` comes from hashing the client with each server's
    /// address. Every shard and every appliance with the same servers and weights picks the
    /// same one, and a server leaving moves only its own clients. Health, operator state,
    /// limits and `exclude` apply as in `pick`.
    pub fn pick_hashed(&self, view: &LoadView, key: u64, exclude: &[ServerId]) -> Option<ServerId> {
        let best_of = |fallback: bool| {
            let mut best: Option<(f64, ServerId)> = None;
            for c in &self.servers {
                if !self.available(c, view, exclude, fallback) {
                    continue;
                }
                // u in (0, 1), never 0: 53 bits of the mixed hash
                let u = ((mix(key ^ c.name_hash) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                let score = -(view.weight(c.id) as f64) / u.ln();
                if best.is_none_or(|(b, _)| score > b) {
                    best = Some((score, c.id));
                }
            }
            best.map(|(_, id)| id)
        };
        best_of(false).or_else(|| {
            if self.any_usable(view) {
                None
            } else {
                best_of(true)
            }
        })
    }

    /// The real server for the next request, or None when none is usable and below its limit.
    /// `exclude`: servers this request already failed on. Servers not yet checked are chosen
    /// only when no server of the pool is up.
    pub fn pick(&self, view: &LoadView, exclude: &[ServerId], now: Instant) -> Option<ServerId> {
        if self.servers.is_empty() {
            return None;
        }
        if let Some(id) = self.pick_among(view, exclude, now, false) {
            return Some(id);
        }
        if self.any_usable(view) {
            return None;
        }
        self.pick_among(view, exclude, now, true)
    }

    fn pick_among(
        &self,
        view: &LoadView,
        exclude: &[ServerId],
        now: Instant,
        fallback: bool,
    ) -> Option<ServerId> {
        let n = self.servers.len();
        let available = |c: &Candidate| self.available(c, view, exclude, fallback);
        match self.method {
            Scheduling::RoundRobin => {
                let start = self.next.get();
                let mut skipped = None;
                for k in 0..n {
                    let i = (start + k) % n;
                    let c = &self.servers[i];
                    if !available(c) {
                        continue;
                    }
                    if !self.takes_turn(c, view, now) {
                        skipped.get_or_insert(i);
                        continue;
                    }
                    self.next.set((i + 1) % n);
                    return Some(c.id);
                }
                // every other server is out: a ramping one takes the request anyway
                let i = skipped?;
                self.next.set((i + 1) % n);
                Some(self.servers[i].id)
            }
            Scheduling::WeightedRoundRobin => {
                // nginx's smooth weighted round-robin over the available servers.
                let mut cur = self.current.borrow_mut();
                let mut total: i64 = 0;
                let mut best: Option<usize> = None;
                for (i, c) in self.servers.iter().enumerate() {
                    if !available(c) {
                        continue;
                    }
                    let w = ((view.weight(c.id) as f64 * self.ramp(c, view, now)) as i64).max(1);
                    cur[i] += w;
                    total += w;
                    if best.is_none_or(|b| cur[i] > cur[b]) {
                        best = Some(i);
                    }
                }
                let b = best?;
                cur[b] -= total;
                Some(self.servers[b].id)
            }
            Scheduling::LeastConnection | Scheduling::WeightedLeastConnection => {
                let weighted = self.method == Scheduling::WeightedLeastConnection;
                let start = self.next.get();
                // The lowest (count + 1) / weight, as HAProxy compares them, ties rotated.
                let best_of = |skip: Option<usize>| {
                    let mut best: Option<(usize, u64, u64)> = None; // (index, count + 1, weight)
                    for k in 0..n {
                        let i = (start + k) % n;
                        let c = &self.servers[i];
                        if Some(i) == skip || !available(c) {
                            continue;
                        }
                        let count = view.global(c.id) as u64 + 1;
                        let w = if weighted {
                            view.weight(c.id) as u64
                        } else {
                            1
                        };
                        // a/wa < b/wb  <=>  a*wb < b*wa
                        if best.is_none_or(|(_, bc, bw)| count * bw < bc * w) {
                            best = Some((i, count, w));
                        }
                    }
                    best.map(|(i, _, _)| i)
                };
                let mut i = best_of(None)?;
                // A ramping winner takes only its share of the picks it would win: scaling
                // its weight instead would keep it out entirely while the pool is idle.
                if !self.takes_turn(&self.servers[i], view, now) {
                    i = best_of(Some(i)).unwrap_or(i);
                }
                self.next.set((i + 1) % n);
                Some(self.servers[i].id)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Persistence;
    use std::rc::Rc;

    fn pool(method: Scheduling, weights: &[(u32, u32)]) -> (Pool, Vec<RealServer>) {
        let servers: Vec<RealServer> = weights
            .iter()
            .enumerate()
            .map(|(i, &(w, l))| RealServer {
                id: ServerId(i),
                pool: 0,
                address: "127.0.0.1:1".parse().unwrap(),
                name: format!("s{i}"),
                weight: w,
                connection_limit: l,
                key: format!("t s{i}"),
                retired: false,
                send_proxy: false,
            })
            .collect();
        let p = Pool {
            id: 0,
            slot: 0,
            name: "t".into(),
            service: 0,
            scheduling: method,
            servers: servers.iter().map(|s| s.id).collect(),
            persistence: Persistence::None,
            health_check: None,
            slow_start: Duration::ZERO,
        };
        (p, servers)
    }

    fn sched(method: Scheduling, weights: &[(u32, u32)]) -> Scheduler {
        let (p, s) = pool(method, weights);
        Scheduler::new(&p, &s, 0)
    }

    /// A view of `weights.len()` servers with their weights, as the shard sets it up.
    fn view(shards: usize, weights: &[(u32, u32)]) -> LoadView {
        let v = LoadView::new(0, shards, weights.len());
        for (i, &(w, _)) in weights.iter().enumerate() {
            v.set_weight(ServerId(i), w);
        }
        v
    }

    fn counts(s: &Scheduler, load: &LoadView, n: usize, k: usize) -> Vec<usize> {
        let mut c = vec![0; k];
        for _ in 0..n {
            c[s.pick(load, &[], Instant::now()).unwrap().0] += 1;
        }
        c
    }

    #[test]
    fn round_robin_alternates() {
        let load = LoadView::new(0, 1, 3);
        let s = sched(Scheduling::RoundRobin, &[(1, 0), (1, 0), (1, 0)]);
        let seq: Vec<_> = (0..6)
            .map(|_| s.pick(&load, &[], Instant::now()).unwrap().0)
            .collect();
        assert_eq!(seq, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn smooth_weighted_round_robin_is_proportional_and_interleaved() {
        let load = view(1, &[(5, 0), (1, 0), (1, 0)]);
        let s = sched(Scheduling::WeightedRoundRobin, &[(5, 0), (1, 0), (1, 0)]);
        let seq: Vec<_> = (0..7)
            .map(|_| s.pick(&load, &[], Instant::now()).unwrap().0)
            .collect();
        // nginx's reference sequence for weights 5,1,1
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(counts(&s, &load, 700, 3), vec![500, 100, 100]);
    }

    #[test]
    fn least_connection_uses_peer_counts() {
        let load = Rc::new(LoadView::new(0, 2, 2));
        let s = sched(Scheduling::LeastConnection, &[(1, 0), (1, 0)]);
        // locally server 0 has more, but the peer shard holds 5 on server 1
        let _l = load.lease(ServerId(0), 0);
        load.apply_snapshot(
            1,
            Snapshot {
                seq: 1,
                active: vec![0, 5],
                acks: vec![0, 0],
                want_ack: false,
            },
        );
        assert_eq!(s.pick(&load, &[], Instant::now()), Some(ServerId(0)));
    }

    #[test]
    fn weighted_least_connection_divides_by_weight() {
        let load = Rc::new(view(1, &[(3, 0), (1, 0)]));
        let s = sched(Scheduling::WeightedLeastConnection, &[(3, 0), (1, 0)]);
        let _a: Vec<_> = (0..2).map(|_| load.lease(ServerId(0), 0)).collect();
        let _b = load.lease(ServerId(1), 0);
        // 2/3 < 1/1
        assert_eq!(s.pick(&load, &[], Instant::now()), Some(ServerId(0)));
    }

    #[test]
    fn rendezvous_is_stable_weighted_and_moves_only_a_leaving_servers_clients() {
        let w = [(1000, 0), (1000, 0), (2000, 0), (1000, 0)];
        let s = sched(Scheduling::RoundRobin, &w);
        let load = view(1, &w);
        let ip = |i: u32| std::net::IpAddr::from((0x0a00_0000 + i).to_be_bytes());
        let before: Vec<ServerId> = (0..5000)
            .map(|i| s.pick_hashed(&load, client_key(ip(i)), &[]).unwrap())
            .collect();
        // another scheduler (shard, appliance) picks the same
        let s2 = Scheduler::new(
            &pool(Scheduling::LeastConnection, &w).0,
            &pool(Scheduling::LeastConnection, &w).1,
            1,
        );
        for (i, b) in before.iter().enumerate() {
            assert_eq!(
                s2.pick_hashed(&load, client_key(ip(i as u32)), &[]),
                Some(*b)
            );
        }
        // shares follow the weights (2000 is twice 1000): 1/5, 1/5, 2/5, 1/5
        let share = |k: usize| before.iter().filter(|b| b.0 == k).count() as f64 / 5000.0;
        assert!((0.37..0.43).contains(&share(2)), "{}", share(2));
        assert!((0.17..0.23).contains(&share(0)), "{}", share(0));
        // server 1 goes down: only its clients move
        load.set_up(ServerId(1), false);
        for (i, b) in before.iter().enumerate() {
            let now = s.pick_hashed(&load, client_key(ip(i as u32)), &[]).unwrap();
            if b.0 != 1 {
                assert_eq!(now, *b, "client {i} moved though its server stayed");
            } else {
                assert_ne!(now.0, 1);
            }
        }
        // IPv4 and its mapped IPv6 form are one client
        let v4: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: std::net::IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(v4), client_key(mapped));
    }

    #[test]
    fn slow_start_ramps_least_connection_even_when_idle() {
        let (mut p, servers) = pool(Scheduling::LeastConnection, &[(1, 0), (1, 0), (1, 0)]);
        p.slow_start = Duration::from_secs(10);
        let s = Scheduler::new(&p, &servers, 0);
        let load = LoadView::new(0, 1, 3);
        load.set_up(ServerId(2), false);
        load.set_up(ServerId(2), true); // back up now: ramping
        let share = |at: Instant| {
            (0..3000)
                .filter(|_| s.pick(&load, &[], at) == Some(ServerId(2)))
                .count() as f64
                / 3000.0
        };
        let now = Instant::now();
        let early = share(now + Duration::from_secs(1));
        let half = share(now + Duration::from_secs(5));
        let done = share(now + Duration::from_secs(11));
        // idle pool, one pick at a time: it grows with the ramp to its third
        assert!((0.02..0.07).contains(&early), "{early} {half} {done}");
        assert!((0.12..0.27).contains(&half), "{early} {half} {done}");
        assert!((0.31..0.36).contains(&done), "{early} {half} {done}");
    }

    #[test]
    fn limits_health_and_operator_state_exclude_servers() {
        let load = Rc::new(LoadView::new(0, 1, 2));
        let s = sched(Scheduling::RoundRobin, &[(1, 1), (1, 0)]);
        let _l = load.lease(ServerId(0), 1);
        for _ in 0..4 {
            assert_eq!(s.pick(&load, &[], Instant::now()), Some(ServerId(1)));
        }
        load.set_up(ServerId(1), false);
        assert_eq!(
            s.pick(&load, &[], Instant::now()),
            None,
            "one at its limit, one down"
        );
        load.set_up(ServerId(1), true);
        load.set_admin_state(ServerId(1), AdminState::Maint);
        assert_eq!(
            s.pick(&load, &[], Instant::now()),
            None,
            "one at its limit, one in maint"
        );
        assert!(!s.accepts(ServerId(0), &load));
        assert!(
            !s.accepts(ServerId(1), &load),
            "maint: not even persisted clients"
        );
        load.set_admin_state(ServerId(1), AdminState::Drain);
        assert_eq!(
            s.pick(&load, &[], Instant::now()),
            None,
            "draining: no new clients"
        );
        assert!(
            s.accepts(ServerId(1), &load),
            "draining: keeps its persisted ones"
        );
        load.set_admin_state(ServerId(1), AdminState::Ready);
        assert!(s.accepts(ServerId(1), &load));
    }
}
