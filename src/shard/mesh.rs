//! The cross-shard mesh: the only way shards talk. Each shard publishes absolute snapshots of
//! its per-real-server active connections (and its accept count); peers keep the latest.
//! Staleness bound: a change is sent within PUBLISH_COALESCE of happening (plus one
//! scheduling quantum of the receiving shard), and every REFRESH even without changes, so a
//! dropped message (full channel) heals within REFRESH.

use super::Shard;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};
use glommio::timer::Timer;
use std::future::poll_fn;
use std::rc::Rc;
use std::time::Duration;

pub const PUBLISH_COALESCE: Duration = Duration::from_millis(1);
pub const REFRESH: Duration = Duration::from_millis(250);
pub const CHANNEL_SIZE: usize = 64;

/// What one shard tells the others.
#[derive(Debug)]
pub enum MeshMsg {
    Load {
        from: usize,
        /// Active upstream connections per `ServerId`, absolute.
        active: Vec<u32>,
        /// Client connections accepted by `from` since start.
        accepted: u64,
    },
}

pub type Mesh = MeshBuilder<MeshMsg, Full>;

pub fn new_mesh(nr_shards: usize) -> Mesh {
    MeshBuilder::full(nr_shards, CHANNEL_SIZE)
}

/// Join the mesh and run the receive and publish loops for `shard` (detached tasks).
pub async fn start(shard: Rc<Shard>, mesh: Mesh) {
    let (senders, mut receivers): (Senders<MeshMsg>, Receivers<MeshMsg>) = match mesh.join().await {
        Ok(x) => x,
        Err(_) => {
            tracing::error!(shard = shard.id, "could not join the shard mesh");
            return;
        }
    };
    for (_, rx) in receivers.streams() {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Some(msg) = rx.recv().await {
                match msg {
                    MeshMsg::Load {
                        from,
                        active,
                        accepted,
                    } => {
                        shard.load.apply_snapshot(from, active);
                        shard.set_peer_accepted(from, accepted);
                    }
                }
            }
        })
        .detach();
    }
    glommio::spawn_local(publish(shard, senders)).detach();
}

async fn publish(shard: Rc<Shard>, senders: Senders<MeshMsg>) {
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
        let snapshot = shard.load.take_snapshot(!changed);
        if let Some(active) = snapshot {
            let accepted = shard.accepted_total();
            let mut lost = false;
            for peer in 0..senders.nr_consumers() {
                if peer == me {
                    continue;
                }
                let msg = MeshMsg::Load {
                    from: shard.id,
                    active: active.clone(),
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
