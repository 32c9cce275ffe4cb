//! Choosing the real server for a request: the scheduling methods over the appliance-wide
//! load view, honouring connection limits. Pure logic over `LoadView`; no I/O.

pub mod load;

pub use load::{Lease, LoadView};

use crate::config::{Scheduling, ServerId, VirtualService};
use std::cell::{Cell, RefCell};

struct Candidate {
    id: ServerId,
    weight: u32,
    limit: u32,
}

/// Per-shard scheduler state for one virtual service.
pub struct Scheduler {
    method: Scheduling,
    servers: Vec<Candidate>,
    /// Round-robin cursor.
    next: Cell<usize>,
    /// Smooth weighted round-robin current weights.
    current: RefCell<Vec<i64>>,
}

impl Scheduler {
    /// `shard` offsets the round-robin start so shards do not all begin on server 0.
    pub fn new(vs: &VirtualService, shard: usize) -> Scheduler {
        let servers: Vec<Candidate> = vs
            .real_servers
            .iter()
            .map(|r| Candidate {
                id: r.id,
                weight: r.weight,
                limit: r.connection_limit,
            })
            .collect();
        let n = servers.len().max(1);
        Scheduler {
            method: vs.scheduling,
            current: RefCell::new(vec![0; servers.len()]),
            servers,
            next: Cell::new(shard % n),
        }
    }

    fn available(&self, c: &Candidate, load: &LoadView) -> bool {
        c.limit == 0 || load.global(c.id) < c.limit
    }

    /// The real server for the next request, or None when every one is at its limit.
    pub fn pick(&self, load: &LoadView) -> Option<ServerId> {
        let n = self.servers.len();
        if n == 0 {
            return None;
        }
        match self.method {
            Scheduling::RoundRobin => {
                let start = self.next.get();
                for k in 0..n {
                    let i = (start + k) % n;
                    if self.available(&self.servers[i], load) {
                        self.next.set((i + 1) % n);
                        return Some(self.servers[i].id);
                    }
                }
                None
            }
            Scheduling::WeightedRoundRobin => {
                // nginx's smooth weighted round-robin over the servers not at their limit.
                let mut cur = self.current.borrow_mut();
                let mut total: i64 = 0;
                let mut best: Option<usize> = None;
                for (i, c) in self.servers.iter().enumerate() {
                    if !self.available(c, load) {
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
                    if !self.available(c, load) {
                        continue;
                    }
                    let count = load.global(c.id) as u64;
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
    use crate::config::{HeadLimits, RealServer};
    use std::rc::Rc;
    use std::time::Duration;

    fn vs(method: Scheduling, weights: &[(u32, u32)]) -> VirtualService {
        VirtualService {
            name: "t".into(),
            listen: "127.0.0.1:1".parse().unwrap(),
            scheduling: method,
            idle_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            pool_size: 1,
            pool_idle_timeout: Duration::from_secs(1),
            limits: HeadLimits::default(),
            real_servers: weights
                .iter()
                .enumerate()
                .map(|(i, &(w, l))| RealServer {
                    id: ServerId(i),
                    address: "127.0.0.1:1".parse().unwrap(),
                    name: format!("s{i}"),
                    weight: w,
                    connection_limit: l,
                })
                .collect(),
            tls: None,
            reencrypt: None,
            redirect: None,
        }
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
        let s = Scheduler::new(&vs(Scheduling::RoundRobin, &[(1, 0), (1, 0), (1, 0)]), 0);
        let seq: Vec<_> = (0..6).map(|_| s.pick(&load).unwrap().0).collect();
        assert_eq!(seq, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn smooth_weighted_round_robin_is_proportional_and_interleaved() {
        let load = LoadView::new(0, 1, 3);
        let s = Scheduler::new(
            &vs(Scheduling::WeightedRoundRobin, &[(5, 0), (1, 0), (1, 0)]),
            0,
        );
        let seq: Vec<_> = (0..7).map(|_| s.pick(&load).unwrap().0).collect();
        // nginx's reference sequence for weights 5,1,1
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(counts(&s, &load, 700, 3), vec![500, 100, 100]);
    }

    #[test]
    fn least_connection_uses_peer_counts() {
        let load = Rc::new(LoadView::new(0, 2, 2));
        let s = Scheduler::new(&vs(Scheduling::LeastConnection, &[(1, 0), (1, 0)]), 0);
        // locally server 0 has more, but the peer shard holds 5 on server 1
        let _l = load.lease(ServerId(0));
        load.apply_snapshot(1, vec![0, 5]);
        assert_eq!(s.pick(&load), Some(ServerId(0)));
    }

    #[test]
    fn weighted_least_connection_divides_by_weight() {
        let load = Rc::new(LoadView::new(0, 1, 2));
        let s = Scheduler::new(
            &vs(Scheduling::WeightedLeastConnection, &[(3, 0), (1, 0)]),
            0,
        );
        let _a: Vec<_> = (0..2).map(|_| load.lease(ServerId(0))).collect();
        let _b = load.lease(ServerId(1));
        // 2/3 < 1/1
        assert_eq!(s.pick(&load), Some(ServerId(0)));
    }

    #[test]
    fn limits_are_honoured_globally() {
        let load = Rc::new(LoadView::new(0, 2, 2));
        let s = Scheduler::new(&vs(Scheduling::RoundRobin, &[(1, 2), (1, 0)]), 0);
        let _l = load.lease(ServerId(0));
        load.apply_snapshot(1, vec![1, 0]);
        for _ in 0..4 {
            assert_eq!(s.pick(&load), Some(ServerId(1)));
        }
        let s2 = Scheduler::new(&vs(Scheduling::RoundRobin, &[(1, 2)]), 0);
        assert_eq!(s2.pick(&load), None);
    }
}
