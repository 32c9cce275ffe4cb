//! Choosing the real server for a request: the scheduling methods over the appliance-wide
//! view (load, health, operator state), honouring connection limits, and persistence. Pure
//! logic over `LoadView` with time passed in; no I/O.

pub mod load;
pub mod persist;

pub use load::{Lease, LoadView, Snapshot};

use crate::config::{Pool, RealServer, Scheduling, ServerId};
use std::cell::{Cell, RefCell};

struct Candidate {
    id: ServerId,
    weight: u32,
    limit: u32,
}

/// Per-shard scheduler state for one pool.
pub struct Scheduler {
    method: Scheduling,
    servers: Vec<Candidate>,
    /// Round-robin cursor.
    next: Cell<usize>,
    /// Smooth weighted round-robin current weights.
    current: RefCell<Vec<i64>>,
}

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
                    weight: r.weight,
                    limit: r.connection_limit,
                }
            })
            .collect();
        let n = servers.len().max(1);
        Scheduler {
            method: pool.scheduling,
            current: RefCell::new(vec![0; servers.len()]),
            servers,
            next: Cell::new(shard % n),
        }
    }

    fn available(&self, c: &Candidate, view: &LoadView) -> bool {
        view.usable(c.id) && view.admits(c.id, c.limit)
    }

    /// May `id` (say, a persisted choice) take this request: up, enabled, below its limit?
    pub fn accepts(&self, id: ServerId, view: &LoadView) -> bool {
        self.servers
            .iter()
            .any(|c| c.id == id && self.available(c, view))
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

    /// The real server for the next request, or None when none is usable and below its limit.
    pub fn pick(&self, view: &LoadView) -> Option<ServerId> {
        let n = self.servers.len();
        if n == 0 {
            return None;
        }
        match self.method {
            Scheduling::RoundRobin => {
                let start = self.next.get();
                for k in 0..n {
                    let i = (start + k) % n;
                    if self.available(&self.servers[i], view) {
                        self.next.set((i + 1) % n);
                        return Some(self.servers[i].id);
                    }
                }
                None
            }
            Scheduling::WeightedRoundRobin => {
                // nginx's smooth weighted round-robin over the available servers.
                let mut cur = self.current.borrow_mut();
                let mut total: i64 = 0;
                let mut best: Option<usize> = None;
                for (i, c) in self.servers.iter().enumerate() {
                    if !self.available(c, view) {
                        continue;
                    }
                    cur[i] += c.weight as i64;
                    total += c.weight as i64;
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
                let mut best: Option<(usize, u64, u64)> = None; // (index, count, weight)
                for k in 0..n {
                    let i = (start + k) % n;
                    let c = &self.servers[i];
                    if !self.available(c, view) {
                        continue;
                    }
                    let count = view.global(c.id) as u64;
                    let w = if weighted { c.weight as u64 } else { 1 };
                    // compare count/w without division: a/wa < b/wb  <=>  a*wb < b*wa
                    let better = match best {
                        None => true,
                        Some((_, bc, bw)) => count * bw < bc * w,
                    };
                    if better {
                        best = Some((i, count, w));
                    }
                }
                let (i, _, _) = best?;
                // rotate ties so equal servers share the load
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
            })
            .collect();
        let p = Pool {
            id: 0,
            name: "t".into(),
            service: 0,
            scheduling: method,
            servers: servers.iter().map(|s| s.id).collect(),
            persistence: Persistence::None,
            health_check: None,
        };
        (p, servers)
    }

    fn sched(method: Scheduling, weights: &[(u32, u32)]) -> Scheduler {
        let (p, s) = pool(method, weights);
        Scheduler::new(&p, &s, 0)
    }

    fn counts(s: &Scheduler, load: &LoadView, n: usize, k: usize) -> Vec<usize> {
        let mut c = vec![0; k];
        for _ in 0..n {
            c[s.pick(load).unwrap().0] += 1;
        }
        c
    }

    #[test]
    fn round_robin_alternates() {
        let load = LoadView::new(0, 1, 3);
        let s = sched(Scheduling::RoundRobin, &[(1, 0), (1, 0), (1, 0)]);
        let seq: Vec<_> = (0..6).map(|_| s.pick(&load).unwrap().0).collect();
        assert_eq!(seq, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn smooth_weighted_round_robin_is_proportional_and_interleaved() {
        let load = LoadView::new(0, 1, 3);
        let s = sched(Scheduling::WeightedRoundRobin, &[(5, 0), (1, 0), (1, 0)]);
        let seq: Vec<_> = (0..7).map(|_| s.pick(&load).unwrap().0).collect();
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
        assert_eq!(s.pick(&load), Some(ServerId(0)));
    }

    #[test]
    fn weighted_least_connection_divides_by_weight() {
        let load = Rc::new(LoadView::new(0, 1, 2));
        let s = sched(Scheduling::WeightedLeastConnection, &[(3, 0), (1, 0)]);
        let _a: Vec<_> = (0..2).map(|_| load.lease(ServerId(0), 0)).collect();
        let _b = load.lease(ServerId(1), 0);
        // 2/3 < 1/1
        assert_eq!(s.pick(&load), Some(ServerId(0)));
    }

    #[test]
    fn limits_health_and_operator_state_exclude_servers() {
        let load = Rc::new(LoadView::new(0, 1, 2));
        let s = sched(Scheduling::RoundRobin, &[(1, 1), (1, 0)]);
        let _l = load.lease(ServerId(0), 1);
        for _ in 0..4 {
            assert_eq!(s.pick(&load), Some(ServerId(1)));
        }
        load.set_up(ServerId(1), false);
        assert_eq!(s.pick(&load), None, "one at its limit, one down");
        load.set_up(ServerId(1), true);
        load.set_enabled(ServerId(1), false);
        assert_eq!(s.pick(&load), None, "one at its limit, one disabled");
        assert!(!s.accepts(ServerId(0), &load));
        load.set_enabled(ServerId(1), true);
        assert!(s.accepts(ServerId(1), &load));
    }
}
