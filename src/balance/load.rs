//! The appliance-wide view of active upstream connections per real server: this shard's exact
//! counts plus the latest absolute snapshot from each peer shard (delivered by the mesh).

use crate::config::ServerId;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

pub struct LoadView {
    shard: usize,
    local: Vec<Cell<u32>>,
    /// `peers[shard][server]`: last snapshot received from that shard (own row unused).
    peers: RefCell<Vec<Vec<u32>>>,
    /// Set when local counts changed since the last publish.
    dirty: Cell<bool>,
    /// The publisher, parked until the next change.
    publisher: RefCell<Option<Waker>>,
}

impl LoadView {
    pub fn new(shard: usize, nr_shards: usize, nr_servers: usize) -> LoadView {
        LoadView {
            shard,
            local: (0..nr_servers).map(|_| Cell::new(0)).collect(),
            peers: RefCell::new(vec![vec![0; nr_servers]; nr_shards]),
            dirty: Cell::new(false),
            publisher: RefCell::new(None),
        }
    }

    pub fn local(&self, id: ServerId) -> u32 {
        self.local.get(id.0).map(Cell::get).unwrap_or(0)
    }

    /// This shard's exact count plus every peer's latest snapshot.
    pub fn global(&self, id: ServerId) -> u32 {
        let peers = self.peers.borrow();
        let others: u32 = peers
            .iter()
            .enumerate()
            .filter(|(s, _)| *s != self.shard)
            .map(|(_, row)| row.get(id.0).copied().unwrap_or(0))
            .sum();
        self.local(id) + others
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

    fn change(&self, id: ServerId, up: bool) {
        if let Some(c) = self.local.get(id.0) {
            c.set(if up {
                c.get() + 1
            } else {
                c.get().saturating_sub(1)
            });
            self.mark_dirty();
        }
    }

    /// Ask for the next publish (a change, or a snapshot that could not be sent).
    pub fn mark_dirty(&self) {
        self.dirty.set(true);
        if let Some(w) = self.publisher.borrow_mut().take() {
            w.wake();
        }
    }

    /// Ready once local counts changed since the last snapshot.
    pub fn poll_changed(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.dirty.get() {
            return Poll::Ready(());
        }
        *self.publisher.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Count one active upstream connection until the lease drops.
    pub fn lease(self: &Rc<Self>, id: ServerId) -> Lease {
        self.change(id, true);
        Lease {
            view: self.clone(),
            id,
        }
    }

    /// Snapshot to publish, if anything changed since the last one.
    pub fn take_snapshot(&self, force: bool) -> Option<Vec<u32>> {
        if !self.dirty.replace(false) && !force {
            return None;
        }
        Some(self.local.iter().map(Cell::get).collect())
    }

    /// Install a peer's absolute snapshot: a late or lost message is simply superseded.
    pub fn apply_snapshot(&self, from: usize, counts: Vec<u32>) {
        let mut peers = self.peers.borrow_mut();
        if from != self.shard && from < peers.len() && counts.len() == self.local.len() {
            peers[from] = counts;
        }
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

    #[test]
    fn global_sums_local_and_peer_snapshots() {
        let v = Rc::new(LoadView::new(0, 3, 2));
        let _a = v.lease(ServerId(1));
        let b = v.lease(ServerId(1));
        v.apply_snapshot(1, vec![4, 1]);
        v.apply_snapshot(2, vec![0, 2]);
        assert_eq!(v.global(ServerId(1)), 2 + 1 + 2);
        assert_eq!(v.global(ServerId(0)), 4);
        assert_eq!(v.per_shard(ServerId(1)), vec![2, 1, 2]);
        drop(b);
        assert_eq!(v.local(ServerId(1)), 1);
        // a later snapshot replaces, never adds
        v.apply_snapshot(1, vec![0, 0]);
        assert_eq!(v.global(ServerId(1)), 1 + 2);
        // own row and malformed snapshots are ignored
        v.apply_snapshot(0, vec![9, 9]);
        v.apply_snapshot(2, vec![9]);
        assert_eq!(v.global(ServerId(1)), 3);
    }

    #[test]
    fn snapshot_only_when_dirty() {
        let v = Rc::new(LoadView::new(0, 2, 1));
        assert!(v.take_snapshot(false).is_none());
        let l = v.lease(ServerId(0));
        assert_eq!(v.take_snapshot(false), Some(vec![1]));
        assert!(v.take_snapshot(false).is_none());
        drop(l);
        assert_eq!(v.take_snapshot(false), Some(vec![0]));
        assert_eq!(v.take_snapshot(true), Some(vec![0]));
    }
}
