//! The appliance-wide view a shard decides with: per real server, active upstream connections
//! (this shard's exact count plus each peer's latest absolute snapshot), health and operator
//! state. Snapshots carry sequence numbers and acknowledgements so a shard that admits beyond
//! its share of a connection limit waits for its peers to have seen it (see `admits`).

use crate::config::ServerId;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

/// A real server's operator state (HAProxy's ready / drain / maint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    Ready,
    /// No new clients; clients persisted to it (cookie, source IP) and requests in flight
    /// go on: the LoadMaster's "disable" for patching.
    Drain,
    /// Nothing new at all.
    Maint,
}

impl AdminState {
    pub fn name(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }
}

/// A real server's health as this shard sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Health-checked but no result yet (start-up, or just added): used only when no server
    /// of its pool is up, so a dead server at start costs a retry, never a failure.
    Checking,
    Up,
    Down,
}

/// `unacked` marker: admitted, not yet in a published snapshot.
const PENDING: u64 = u64::MAX;

/// A load snapshot as published to peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub seq: u64,
    pub active: Vec<u32>,
    /// Latest snapshot seq applied from each shard.
    pub acks: Vec<u64>,
    /// The receiver should publish soon, acknowledging this one.
    pub want_ack: bool,
}

pub struct LoadView {
    shard: usize,
    nr_shards: usize,
    local: Vec<Cell<u32>>,
    /// `peers[shard][server]`: last snapshot received from that shard (own row unused).
    peers: RefCell<Vec<Vec<u32>>>,
    /// Seq of our latest snapshot.
    seq: Cell<u64>,
    /// Latest seq applied from each peer.
    seen: RefCell<Vec<u64>>,
    /// Our latest seq each peer has acknowledged.
    acked_by: RefCell<Vec<u64>>,
    /// Per server: seq of our snapshot holding a beyond-share admission not yet acknowledged
    /// by every peer (0: none; PENDING: not yet published).
    unacked: Vec<Cell<u64>>,
    want_ack: Cell<bool>,
    /// Health as decided by the shard that checks the server, or by passive failures.
    health: Vec<Cell<Health>>,
    /// When a server came back up after being down (for slow start); None at start.
    up_since: Vec<Cell<Option<Instant>>>,
    /// When the health or operator state last changed (None: not since start).
    changed_at: Vec<Cell<Option<Instant>>>,
    /// Operator state (runtime API).
    admin: Vec<Cell<AdminState>>,
    /// Current weights (the config's, or the runtime API's).
    weights: Vec<Cell<u32>>,
    dirty: Cell<bool>,
    /// Server slots the configuration uses (snapshots carry only these).
    in_use: Cell<usize>,
    publisher: RefCell<Option<Waker>>,
    /// Bumped whenever capacity may have freed up (a release here, a snapshot or an
    /// acknowledgement from a peer, an operator or health change): queued requests retry.
    capacity_gen: Cell<u64>,
    capacity_waiters: RefCell<Vec<Waker>>,
}

impl LoadView {
    pub fn new(shard: usize, nr_shards: usize, nr_servers: usize) -> LoadView {
        let cells = |v: u32| (0..nr_servers).map(|_| Cell::new(v)).collect::<Vec<_>>();
        LoadView {
            shard,
            nr_shards,
            local: cells(0),
            peers: RefCell::new(vec![vec![0; nr_servers]; nr_shards]),
            seq: Cell::new(0),
            seen: RefCell::new(vec![0; nr_shards]),
            acked_by: RefCell::new(vec![0; nr_shards]),
            unacked: (0..nr_servers).map(|_| Cell::new(0)).collect(),
            want_ack: Cell::new(false),
            health: (0..nr_servers).map(|_| Cell::new(Health::Up)).collect(),
            up_since: (0..nr_servers).map(|_| Cell::new(None)).collect(),
            changed_at: (0..nr_servers).map(|_| Cell::new(None)).collect(),
            admin: (0..nr_servers)
                .map(|_| Cell::new(AdminState::Ready))
                .collect(),
            weights: (0..nr_servers).map(|_| Cell::new(1000)).collect(),
            dirty: Cell::new(false),
            in_use: Cell::new(nr_servers),
            publisher: RefCell::new(None),
            capacity_gen: Cell::new(0),
            capacity_waiters: RefCell::new(Vec::new()),
        }
    }

    pub fn local(&self, id: ServerId) -> u32 {
        self.local.get(id.0).map(Cell::get).unwrap_or(0)
    }

    fn peer_sum(&self, id: ServerId, floor: u32) -> u32 {
        let peers = self.peers.borrow();
        peers
            .iter()
            .enumerate()
            .filter(|(s, _)| *s != self.shard)
            .map(|(_, row)| row.get(id.0).copied().unwrap_or(0).max(floor))
            .sum()
    }

    /// This shard's exact count plus every peer's latest snapshot.
    pub fn global(&self, id: ServerId) -> u32 {
        self.local(id) + self.peer_sum(id, 0)
    }

    /// Per-shard counts for one server, own shard exact.
    pub fn per_shard(&self, id: ServerId) -> Vec<u32> {
        let peers = self.peers.borrow();
        (0..peers.len())
            .map(|s| {
                if s == self.shard {
                    self.local(id)
                } else {
                    peers[s].get(id.0).copied().unwrap_or(0)
                }
            })
            .collect()
    }

    /// Healthy and ready: may get new clients.
    pub fn usable(&self, id: ServerId) -> bool {
        self.health(id) == Health::Up && self.admin_state(id) == AdminState::Ready
    }

    /// Healthy and ready or draining: may serve a client persisted to it.
    pub fn keeps_persisted(&self, id: ServerId) -> bool {
        self.health(id) == Health::Up && self.admin_state(id) != AdminState::Maint
    }

    /// Not yet checked and ready: a candidate only while nothing in its pool is up.
    pub fn fallback(&self, id: ServerId) -> bool {
        self.health(id) == Health::Checking && self.admin_state(id) == AdminState::Ready
    }

    pub fn health(&self, id: ServerId) -> Health {
        self.health.get(id.0).map(Cell::get).unwrap_or(Health::Down)
    }

    pub fn is_up(&self, id: ServerId) -> bool {
        self.health(id) == Health::Up
    }

    /// Since when a server that had been down is up again (None: up since start, or down).
    pub fn up_since(&self, id: ServerId) -> Option<Instant> {
        self.up_since.get(id.0).and_then(Cell::get)
    }

    /// A new server in a reused place: no slow-start ramp inherited.
    pub fn clear_up_since(&self, id: ServerId) {
        if let Some(t) = self.up_since.get(id.0) {
            t.set(None);
        }
    }

    /// A health-checked server starts in `Checking` (no traffic until its first good check).
    pub fn set_checking(&self, id: ServerId) {
        if let Some(c) = self.health.get(id.0) {
            if c.replace(Health::Checking) != Health::Checking {
                self.changed(id);
            }
        }
    }

    fn changed(&self, id: ServerId) {
        if let Some(t) = self.changed_at.get(id.0) {
            t.set(Some(Instant::now()));
        }
    }

    /// When the server's health or operator state last changed (None: not since start).
    pub fn changed_at(&self, id: ServerId) -> Option<Instant> {
        self.changed_at.get(id.0).and_then(Cell::get)
    }

    pub fn admin_state(&self, id: ServerId) -> AdminState {
        self.admin
            .get(id.0)
            .map(Cell::get)
            .unwrap_or(AdminState::Maint)
    }

    pub fn weight(&self, id: ServerId) -> u32 {
        self.weights.get(id.0).map(Cell::get).unwrap_or(1)
    }

    pub fn set_weight(&self, id: ServerId, weight: u32) {
        if let Some(c) = self.weights.get(id.0) {
            c.set(weight.max(1));
        }
    }

    pub fn set_up(&self, id: ServerId, up: bool) {
        let new = if up { Health::Up } else { Health::Down };
        if let Some(c) = self.health.get(id.0) {
            let old = c.replace(new);
            if old != new {
                if let Some(t) = self.up_since.get(id.0) {
                    // Slow start ramps a server that comes back, not one seen for the first time.
                    t.set((old == Health::Down && up).then(Instant::now));
                }
                self.changed(id);
                self.notify_capacity();
            }
        }
    }

    pub fn set_admin_state(&self, id: ServerId, state: AdminState) {
        if let Some(c) = self.admin.get(id.0) {
            if c.replace(state) != state {
                self.changed(id);
                self.notify_capacity();
            }
        }
    }

    /// The configuration uses the first `n` server slots (it only grows).
    pub fn set_in_use(&self, n: usize) {
        self.in_use.set(n.min(self.local.len()));
    }

    /// Current capacity generation, to wait for the next change with `poll_capacity`.
    pub fn capacity_gen(&self) -> u64 {
        self.capacity_gen.get()
    }

    /// Ready once capacity may have changed since generation `since`.
    pub fn poll_capacity(&self, cx: &mut Context<'_>, since: u64) -> Poll<()> {
        if self.capacity_gen.get() != since {
            return Poll::Ready(());
        }
        self.capacity_waiters.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }

    fn notify_capacity(&self) {
        self.capacity_gen.set(self.capacity_gen.get() + 1);
        let waiters = std::mem::take(&mut *self.capacity_waiters.borrow_mut());
        for w in waiters {
            w.wake();
        }
    }

    /// May this shard open one more connection to `id` under `limit` (0 = none)?
    ///
    /// The appliance-wide count (own exact + peers' snapshots) must be below the limit, and a
    /// shard admits to a limited server only once its peers have acknowledged its previous
    /// admission there. Each peer thus holds at most one admission this shard has not seen, so
    /// the limit is overshot by at most `shards - 1`, however late messages are. The price:
    /// admissions to a *limited* server are paced by the mesh round trip on each shard.
    pub fn admits(&self, id: ServerId, limit: u32) -> bool {
        limit == 0 || (self.acknowledged(id) && self.global(id) < limit)
    }

    /// Is `id` held back only by this shard's unacknowledged admission (worth a short wait)?
    pub fn awaiting_ack(&self, id: ServerId, limit: u32) -> bool {
        limit > 0 && !self.acknowledged(id) && self.global(id) < limit
    }

    fn acknowledged(&self, id: ServerId) -> bool {
        let u = match self.unacked.get(id.0) {
            Some(c) => c.get(),
            None => return true,
        };
        if u == 0 {
            return true;
        }
        if u == PENDING {
            return false;
        }
        let acked = self.acked_by.borrow();
        let all = (0..self.nr_shards)
            .filter(|&s| s != self.shard)
            .all(|s| acked[s] >= u);
        if all {
            self.unacked[id.0].set(0);
        }
        all
    }

    fn change(&self, id: ServerId, up: bool) {
        if let Some(c) = self.local.get(id.0) {
            c.set(if up {
                c.get() + 1
            } else {
                c.get().saturating_sub(1)
            });
            self.mark_dirty();
            if !up {
                self.notify_capacity();
            }
        }
    }

    /// Ask for the next publish (a change, or a snapshot that could not be sent).
    pub fn mark_dirty(&self) {
        self.dirty.set(true);
        if let Some(w) = self.publisher.borrow_mut().take() {
            w.wake();
        }
    }

    /// Ready once there is something to publish.
    pub fn poll_changed(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.dirty.get() {
            return Poll::Ready(());
        }
        *self.publisher.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Count one active upstream connection to `id` until the lease drops. Under a `limit`,
    /// the admission must be acknowledged by every peer before the next one (see `admits`).
    pub fn lease(self: &Rc<Self>, id: ServerId, limit: u32) -> Lease {
        if limit > 0 && self.nr_shards > 1 {
            if let Some(u) = self.unacked.get(id.0) {
                u.set(PENDING);
                self.want_ack.set(true);
            }
        }
        self.change(id, true);
        Lease {
            view: self.clone(),
            id,
        }
    }

    /// Snapshot to publish, if anything changed since the last one (or `force`).
    pub fn take_snapshot(&self, force: bool) -> Option<Snapshot> {
        if !self.dirty.replace(false) && !force {
            return None;
        }
        let seq = self.seq.get() + 1;
        self.seq.set(seq);
        for u in &self.unacked {
            if u.get() == PENDING {
                u.set(seq);
            }
        }
        Some(Snapshot {
            seq,
            active: self.local[..self.in_use.get().min(self.local.len())]
                .iter()
                .map(Cell::get)
                .collect(),
            acks: self.seen.borrow().clone(),
            want_ack: self.want_ack.replace(false),
        })
    }

    /// Install a peer's absolute snapshot: a late or lost message is simply superseded.
    pub fn apply_snapshot(&self, from: usize, snap: Snapshot) {
        // a peer may still be on a configuration with fewer servers (a reload under way)
        if from == self.shard || from >= self.nr_shards || snap.active.len() > self.local.len() {
            return;
        }
        {
            let mut seen = self.seen.borrow_mut();
            if snap.seq <= seen[from] {
                return; // older than what we have
            }
            seen[from] = snap.seq;
        }
        if let Some(&a) = snap.acks.get(self.shard) {
            let mut acked = self.acked_by.borrow_mut();
            acked[from] = acked[from].max(a);
        }
        self.peers.borrow_mut()[from] = snap.active;
        if snap.want_ack {
            self.mark_dirty();
        }
        self.notify_capacity();
    }
}

/// One active upstream connection, counted for as long as it lives.
pub struct Lease {
    view: Rc<LoadView>,
    id: ServerId,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.view.change(self.id, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(seq: u64, active: Vec<u32>, acks: Vec<u64>) -> Snapshot {
        Snapshot {
            seq,
            active,
            acks,
            want_ack: false,
        }
    }

    #[test]
    fn global_sums_local_and_peer_snapshots() {
        let v = Rc::new(LoadView::new(0, 3, 2));
        let _a = v.lease(ServerId(1), 0);
        let b = v.lease(ServerId(1), 0);
        v.apply_snapshot(1, snap(1, vec![4, 1], vec![0; 3]));
        v.apply_snapshot(2, snap(1, vec![0, 2], vec![0; 3]));
        assert_eq!(v.global(ServerId(1)), 2 + 1 + 2);
        assert_eq!(v.global(ServerId(0)), 4);
        assert_eq!(v.per_shard(ServerId(1)), vec![2, 1, 2]);
        drop(b);
        assert_eq!(v.local(ServerId(1)), 1);
        // a later snapshot replaces, never adds; an older one is ignored
        v.apply_snapshot(1, snap(3, vec![0, 0], vec![0; 3]));
        v.apply_snapshot(1, snap(2, vec![9, 9], vec![0; 3]));
        assert_eq!(v.global(ServerId(1)), 1 + 2);
        // own row and malformed (longer) snapshots are ignored
        v.apply_snapshot(0, snap(9, vec![9, 9], vec![0; 3]));
        v.apply_snapshot(2, snap(9, vec![9, 9, 9], vec![0; 3]));
        assert_eq!(v.global(ServerId(1)), 3);
        // a shorter one is a peer still on a configuration with fewer servers
        v.apply_snapshot(2, snap(10, vec![5], vec![0; 3]));
        assert_eq!(v.global(ServerId(0)), 5);
        assert_eq!(v.global(ServerId(1)), 1);
    }

    #[test]
    fn snapshot_only_when_dirty() {
        let v = Rc::new(LoadView::new(0, 2, 1));
        assert!(v.take_snapshot(false).is_none());
        let l = v.lease(ServerId(0), 0);
        assert_eq!(v.take_snapshot(false).unwrap().active, vec![1]);
        assert!(v.take_snapshot(false).is_none());
        drop(l);
        assert_eq!(v.take_snapshot(false).unwrap().active, vec![0]);
        assert_eq!(v.take_snapshot(true).unwrap().seq, 3);
    }

    /// Two shards that never hear from each other still overshoot a limit by at most one.
    #[test]
    fn limit_overshoot_is_bounded_without_any_messages() {
        let limit = 10;
        // no messages at all: each shard gets one admission, then waits for acknowledgements
        let a = Rc::new(LoadView::new(0, 2, 1));
        let b = Rc::new(LoadView::new(1, 2, 1));
        let mut leases = Vec::new();
        for _ in 0..100 {
            for v in [&a, &b] {
                if v.admits(ServerId(0), limit) {
                    leases.push(v.lease(ServerId(0), limit));
                }
            }
        }
        let total = a.local(ServerId(0)) + b.local(ServerId(0));
        assert_eq!(total, 2, "one unacknowledged admission per shard");
    }

    /// With acknowledgements flowing, the shards fill the limit exactly between them.
    #[test]
    fn acknowledged_admissions_fill_the_limit() {
        let limit = 5;
        let a = Rc::new(LoadView::new(0, 2, 1));
        let b = Rc::new(LoadView::new(1, 2, 1));
        let mut leases = Vec::new();
        let exchange = |a: &LoadView, b: &LoadView| {
            if let Some(s) = a.take_snapshot(true) {
                b.apply_snapshot(0, s);
            }
            if let Some(s) = b.take_snapshot(true) {
                a.apply_snapshot(1, s);
            }
            if let Some(s) = a.take_snapshot(true) {
                b.apply_snapshot(0, s);
            }
        };
        for i in 0..20 {
            // both shards try in the same round, before they hear of each other
            for v in [&a, &b] {
                if v.admits(ServerId(0), limit) {
                    leases.push(v.lease(ServerId(0), limit));
                }
            }
            let total = a.local(ServerId(0)) + b.local(ServerId(0));
            assert!(
                total <= limit + 1,
                "round {i}: {total} admitted under a limit of {limit}"
            );
            exchange(&a, &b);
        }
        assert!(a.local(ServerId(0)) + b.local(ServerId(0)) >= limit);
        assert!(!a.admits(ServerId(0), limit) && !b.admits(ServerId(0), limit));
    }
}
