//! The cross-shard mesh: the only way shards talk. Each shard publishes absolute snapshots of
//! its per-real-server active connections (with sequence numbers and acknowledgements, see
//! `balance::load`); the shard that health-checks a server tells the others each result; the
//! admin shard tells the others operator changes and waits for their acknowledgements.
//!
//! Staleness bound: a load change is sent within PUBLISH_COALESCE of happening (plus one
//! scheduling quantum of the receiving shard), and every REFRESH even without changes, so a
//! dropped snapshot (full channel) heals within REFRESH. Health and operator messages are
//! sent with back-pressure (never dropped).

use super::{CheckResult, State};
use crate::balance::Snapshot;
use crate::config::ServerId;
use crate::metrics::MetricsSnapshot;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};
use glommio::timer::Timer;
use std::future::poll_fn;
use std::rc::Rc;
use std::time::Duration;

pub const PUBLISH_COALESCE: Duration = Duration::from_millis(1);
pub const REFRESH: Duration = Duration::from_millis(250);
pub const CHANNEL_SIZE: usize = 256;

/// A runtime change of a real server, applied on every shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminChange {
    State(ServerId, crate::balance::AdminState),
    Weight(ServerId, u32),
    /// Health handed over by the process this one replaces (binary upgrade).
    Health(ServerId, bool),
}

/// What one shard tells the others.
#[derive(Debug)]
pub enum MeshMsg {
    Load {
        from: usize,
        snap: Snapshot,
        /// Client connections accepted by `from` since start.
        accepted: u64,
    },
    /// A health-check result for `server` and the state it leads to.
    Health {
        server: usize,
        up: bool,
        ok: bool,
        at_unix_ms: u64,
        detail: String,
        latency_ms: f64,
    },
    /// `server` failed passive health on the sender: take it out now.
    PassiveDown { server: usize },
    /// An operator's change (runtime API), to apply and acknowledge to `from`.
    Admin {
        from: usize,
        id: u64,
        change: AdminChange,
    },
    /// Change `id` is applied on the sender (sent to all: peer order is not shard order).
    AdminAck { to: usize, id: u64 },
    /// The admin shard asks every shard for its metrics.
    MetricsQuery { from: usize, id: u64 },
    /// A shard's metrics, for shard `to` (sent to all: mesh peer order is not shard order).
    MetricsReply {
        to: usize,
        id: u64,
        snap: Box<MetricsSnapshot>,
    },
}

pub type Mesh = MeshBuilder<MeshMsg, Full>;

pub fn new_mesh(nr_shards: usize) -> Mesh {
    MeshBuilder::full(nr_shards, CHANNEL_SIZE)
}

/// Sending side of the mesh, shared by this shard's tasks.
pub struct Outbox {
    senders: Senders<MeshMsg>,
}

impl Outbox {
    /// Send a message made by `make` to every other shard, waiting if a channel is full.
    pub async fn broadcast(&self, make: impl Fn() -> MeshMsg) {
        let me = self.senders.peer_id();
        for peer in 0..self.senders.nr_consumers() {
            if peer != me {
                let _ = self.senders.send_to(peer, make()).await;
            }
        }
    }
}

/// Apply a message from another shard to this shard's view.
fn apply(shard: &State, msg: MeshMsg) {
    match msg {
        MeshMsg::Load {
            from,
            snap,
            accepted,
        } => {
            shard.load.apply_snapshot(from, snap);
            shard.set_peer_accepted(from, accepted);
        }
        MeshMsg::Health {
            server,
            up,
            ok,
            at_unix_ms,
            detail,
            latency_ms,
        } => {
            shard.load.set_up(ServerId(server), up);
            if let Some(slot) = shard.checks.borrow_mut().get_mut(server) {
                *slot = Some(CheckResult {
                    ok,
                    at_unix_ms,
                    detail,
                    latency_ms,
                });
            }
        }
        MeshMsg::PassiveDown { server } => {
            let current = shard.current();
            if current
                .config
                .servers
                .get(server)
                .is_some_and(|rs| !rs.retired)
            {
                current.passive_down(ServerId(server));
            }
        }
        MeshMsg::Admin { from, id, change } => {
            shard.apply_change(change);
            let outbox = shard.mesh.borrow().clone();
            if let Some(o) = outbox {
                glommio::spawn_local(async move {
                    o.broadcast(|| MeshMsg::AdminAck { to: from, id }).await;
                })
                .detach();
            }
        }
        MeshMsg::AdminAck { to, id } => {
            if to == shard.id {
                shard.admin_acked(id);
            }
        }
        MeshMsg::MetricsQuery { from, id } => {
            // answer from a task: the reply may wait for channel room
            let snap = Box::new(shard.metrics_snapshot());
            let outbox = shard.mesh.borrow().clone();
            if let Some(o) = outbox {
                glommio::spawn_local(async move {
                    o.broadcast(|| MeshMsg::MetricsReply {
                        to: from,
                        id,
                        snap: snap.clone(),
                    })
                    .await;
                })
                .detach();
            }
        }
        MeshMsg::MetricsReply { to, id, snap } => {
            if to == shard.id {
                shard.metrics_reply(id, *snap);
            }
        }
    }
}

/// Join the mesh and run the receive and publish loops for `shard` (detached tasks).
pub async fn start(shard: Rc<State>, mesh: Mesh) {
    let (senders, mut receivers): (Senders<MeshMsg>, Receivers<MeshMsg>) = match mesh.join().await {
        Ok(x) => x,
        Err(_) => {
            tracing::error!(shard = shard.id, "could not join the shard mesh");
            return;
        }
    };
    for (_, rx) in receivers.streams() {
        let shard = shard.clone();
        crate::runtime::supervise(shard.id, "mesh", async move {
            while let Some(msg) = rx.recv().await {
                apply(&shard, msg);
            }
        });
    }
    let outbox = Rc::new(Outbox { senders });
    *shard.mesh.borrow_mut() = Some(outbox.clone());
    crate::runtime::supervise(shard.id, "mesh publisher", publish(shard, outbox));
}

async fn publish(shard: Rc<State>, outbox: Rc<Outbox>) {
    let senders = &outbox.senders;
    let me = senders.peer_id();
    loop {
        // Wake on a local change, or on the refresh tick.
        let changed = futures_lite::future::or(
            async {
                poll_fn(|cx| shard.load.poll_changed(cx)).await;
                true
            },
            async {
                Timer::new(REFRESH).await;
                false
            },
        )
        .await;
        if shard.is_closing() && shard.nr_clients() == 0 {
            return;
        }
        if let Some(snap) = shard.load.take_snapshot(!changed) {
            let accepted = shard.accepted_total();
            let mut lost = false;
            for peer in 0..senders.nr_consumers() {
                if peer == me {
                    continue;
                }
                let msg = MeshMsg::Load {
                    from: shard.id,
                    snap: snap.clone(),
                    accepted,
                };
                if senders.try_send_to(peer, msg).is_err() {
                    lost = true;
                }
            }
            if lost {
                shard.load.mark_dirty();
            }
        }
        Timer::new(PUBLISH_COALESCE).await;
    }
}
