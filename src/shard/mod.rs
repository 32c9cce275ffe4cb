//! Shards: one pinned glommio executor per configured core, each owning its listeners, its
//! upstream pools, its schedulers and its half of the load view. Start-up is all-or-nothing;
//! shutdown stops accepting, drains in-flight requests for a bounded time, then returns.

pub mod mesh;
pub mod sockets;

use crate::admin;
use crate::balance::persist::{CookieSigner, SourceTable};
use crate::balance::{LoadView, Scheduler};
use crate::client::{self, Client, ClientStream, ConnFacts};
use crate::config::LimitAction;
use crate::config::{Config, Persistence, RealServer, ServerId};
use crate::limits::{ClientTable, Limit};
use crate::log::{Kind, LogWriter, ShardLog};
use crate::metrics::{merge, Merged, MetricsSnapshot, ShardMetrics};
use crate::net;
use crate::proxy;
use crate::tls::{self, TicketKeys};
use crate::upstream::Pools;
use futures_rustls::{TlsAcceptor, TlsConnector};
use glommio::net::TcpListener;
use glommio::sync::Semaphore;
use glommio::{LocalExecutorBuilder, Placement};
use rustls_pki_types::ServerName;
use std::cell::{Cell, RefCell};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Client read buffer size (a request head must fit; bodies stream through it).
pub const BUF_SIZE: usize = 16 * 1024;
/// Idle buffers a shard keeps for reuse.
const STORAGE_POOL: usize = 1024;
/// Read buffer of a large response while it streams: 16 times fewer reads, writes and
/// wake-ups of the client than the connection's own buffer (CPU per MiB measured 0.66x).
pub const BULK_SIZE: usize = 256 * 1024;
/// Large responses streaming through bulk buffers at once, per shard (bounds their memory
/// at 16 MiB; beyond it a response streams through its connection's own buffer).
const BULK_IN_USE: usize = 64;
/// Connection workspaces kept for reuse.
const WORKSPACE_POOL: usize = 256;
/// Bulk buffers kept for reuse.
const BULK_POOL: usize = 8;

/// What one shard keeps for its whole life, whatever the configuration: sockets' parking lot,
/// buffers, counters and connection counts, the load view, persistence tables. `!Send`: it
/// never leaves its executor. Per-service, per-pool and per-server state is sized once for the
/// configuration's `slots` and indexed by slot, so a reload never moves it.
pub struct State {
    pub id: usize,
    pub nr_shards: usize,
    pub core: usize,
    pub load: Rc<LoadView>,
    pub pools: Pools,
    /// Per pool slot with source-IP persistence: this shard's table.
    pub source_tables: Vec<RefCell<Option<SourceTable>>>,
    pub cookies: CookieSigner,
    /// Latest health-check result per server, as reported over the mesh.
    pub checks: RefCell<Vec<Option<CheckResult>>>,
    /// Read-buffer storage of connections that went idle, for the next busy one.
    storage: RefCell<Vec<Box<[u8]>>>,
    bulk: RefCell<Vec<Box<[u8]>>>,
    nr_bulk: Cell<usize>,
    workspaces: RefCell<Vec<proxy::Workspace>>,
    /// Where idle connections' first bytes land (borrowed only within a poll).
    pub scratch: RefCell<Box<[u8]>>,
    /// Idle keep-alive client connections, waiting without a task.
    pub lot: crate::client::ParkingLot,
    /// Requests waiting for room under connection limits.
    pub queued: Cell<usize>,
    closing: Cell<bool>,
    /// Closed (never signalled) at shutdown: every waiter wakes at once.
    close_signal: Semaphore,
    nr_clients: Cell<usize>,
    /// Client connections per virtual service slot.
    vs_conns: Vec<Cell<u32>>,
    /// Per virtual service slot with client limits: this shard's clients.
    clients: Vec<RefCell<Option<ClientTable>>>,
    /// When each address was last security-logged for a service/appliance limit.
    limit_log: RefCell<ClientTable>,
    accepted: Cell<u64>,
    peer_accepted: RefCell<Vec<u64>>,
    pub started: Instant,
    /// Set once the mesh is joined: how to tell the other shards.
    pub mesh: RefCell<Option<Rc<mesh::Outbox>>>,
    pub log: ShardLog,
    pub metrics: ShardMetrics,
    /// Metrics gathering on the admin shard: the last query id, and the replies so far of
    /// each gather in progress (two overlapping scrapes each get their own).
    metrics_query: Cell<u64>,
    metrics_replies: RefCell<Vec<(u64, Vec<MetricsSnapshot>)>>,
    /// Per ServerId: connect failures or resets in a row seen by this shard (passive health).
    passive: Vec<Cell<u32>>,
    /// Repetitive diagnostics (refusals, failed handshakes) are rate-limited per kind.
    diag_limit: crate::diag::RateLimit,
    /// Connections refused by a limit that are being told so (at most MAX_REFUSING).
    refusing: Cell<usize>,
    /// Operator changes sent from this shard: id, and the peers that acknowledged it.
    admin_changes: Cell<u64>,
    admin_acks: RefCell<Vec<(u64, usize)>>,
    pub secrets: Arc<Secrets>,
    /// The generation new requests use.
    current: RefCell<Option<Rc<Shard>>>,
    /// Per ServerId: this shard runs its health check.
    pub(crate) checking: RefCell<Vec<bool>>,
    /// `current`'s generation, read by every request.
    generation: Cell<u64>,
    /// This shard's listeners: address, and the signal that stops its accept loop.
    listeners: RefCell<Vec<(SocketAddr, Rc<Semaphore>)>>,
}

/// One configuration generation on one shard: the config and what is built from it (TLS
/// acceptors and connectors, schedulers). A request holds the generation it started with;
/// the next request of its connection takes the current one. Everything else it reaches
/// through `Deref` to the shard's lasting `State`.
pub struct Shard {
    pub state: Rc<State>,
    /// Config generation: 1 at start, one more per reload.
    pub generation: u64,
    pub config: Arc<Config>,
    /// One per pool (`config.pools`), in config order.
    pub schedulers: Vec<Scheduler>,
    /// Per virtual service: the TLS acceptor of a service that terminates TLS.
    acceptors: Vec<Option<TlsAcceptor>>,
    /// Per virtual service: the connector of a service that re-encrypts.
    pub connectors: Vec<Option<TlsConnector>>,
    /// Per ServerId: the name its certificate is verified against (re-encryption only).
    upstream_names: Vec<Option<ServerName<'static>>>,
    /// HTTPS on the admin listener (shard 0, when `[admin] tls` is set).
    pub admin_acceptor: Option<TlsAcceptor>,
}

impl std::ops::Deref for Shard {
    type Target = State;
    fn deref(&self) -> &State {
        &self.state
    }
}

/// Refused connections a shard answers at once (429/503); beyond, they are closed unanswered.
const MAX_REFUSING: usize = 256;

/// Without an active health check, a server taken out by passive health is tried again after
/// this long (nginx's fail_timeout).
pub const PASSIVE_RETRY: Duration = Duration::from_secs(10);

/// One health-check outcome, for /status.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub ok: bool,
    pub at_unix_ms: u64,
    pub detail: String,
}

/// TLS built from a config for one shard: made by every shard for itself (each its own
/// session caches), and once by the main thread before a reload to refuse a bad one.
pub struct TlsParts {
    acceptors: Vec<Option<TlsAcceptor>>,
    connectors: Vec<Option<TlsConnector>>,
    upstream_names: Vec<Option<ServerName<'static>>>,
    admin_acceptor: Option<TlsAcceptor>,
}

impl TlsParts {
    pub fn new(config: &Config, secrets: &Secrets, admin: bool) -> Result<TlsParts, String> {
        let mut acceptors = Vec::new();
        let mut connectors = Vec::new();
        for vs in &config.services {
            acceptors.push(match &vs.tls {
                Some(t) => Some(TlsAcceptor::from(tls::server_config(
                    t,
                    secrets.tickets.clone(),
                )?)),
                None => None,
            });
            connectors.push(match &vs.reencrypt {
                Some(r) => Some(TlsConnector::from(tls::client_config(r)?)),
                None => None,
            });
        }
        let mut upstream_names = Vec::new();
        for rs in &config.servers {
            // a retired server's pool index belongs to an earlier config
            let reencrypt = match rs.retired {
                true => None,
                false => config.services[config.pools[rs.pool].service]
                    .reencrypt
                    .as_ref(),
            };
            upstream_names.push(match reencrypt {
                Some(r) => Some(tls::upstream_name(r, &rs.name)?),
                None => None,
            });
        }
        let admin_acceptor = match config.admin.as_ref().and_then(|a| a.tls.as_ref()) {
            Some(t) if admin => Some(TlsAcceptor::from(tls::server_config(
                t,
                secrets.tickets.clone(),
            )?)),
            _ => None,
        };
        Ok(TlsParts {
            acceptors,
            connectors,
            upstream_names,
            admin_acceptor,
        })
    }
}

impl State {
    pub fn new(id: usize, config: &Config, secrets: Arc<Secrets>, log: Arc<LogWriter>) -> State {
        let nr_shards = config.runtime.cores.len();
        let slots = config.slots;
        let load = Rc::new(LoadView::new(id, nr_shards, slots.servers));
        State {
            id,
            nr_shards,
            core: config.runtime.cores[id],
            load,
            passive: (0..slots.servers).map(|_| Cell::new(0)).collect(),
            diag_limit: Default::default(),
            refusing: Cell::new(0),
            admin_changes: Cell::new(0),
            admin_acks: RefCell::new(Vec::new()),
            pools: Pools::new(slots.servers),
            source_tables: (0..slots.pools).map(|_| RefCell::new(None)).collect(),
            cookies: CookieSigner::new(&secrets.cookie_key),
            checks: RefCell::new(vec![None; slots.servers]),
            queued: Cell::new(0),
            storage: RefCell::new(Vec::new()),
            bulk: RefCell::new(Vec::new()),
            nr_bulk: Cell::new(0),
            workspaces: RefCell::new(Vec::new()),
            scratch: RefCell::new(vec![0u8; BUF_SIZE].into_boxed_slice()),
            lot: Default::default(),
            closing: Cell::new(false),
            close_signal: Semaphore::new(0),
            nr_clients: Cell::new(0),
            vs_conns: (0..slots.services).map(|_| Cell::new(0)).collect(),
            clients: (0..slots.services).map(|_| RefCell::new(None)).collect(),
            limit_log: RefCell::new(ClientTable::new(10_000)),
            accepted: Cell::new(0),
            peer_accepted: RefCell::new(vec![0; nr_shards]),
            started: Instant::now(),
            mesh: RefCell::new(None),
            log: ShardLog::new(log),
            metrics: ShardMetrics::new(&slots),
            metrics_query: Cell::new(0),
            metrics_replies: RefCell::new(Vec::new()),
            secrets,
            current: RefCell::new(None),
            checking: RefCell::new(vec![false; slots.servers]),
            generation: Cell::new(0),
            listeners: RefCell::new(Vec::new()),
        }
    }

    /// The generation new requests use.
    pub fn current(&self) -> Rc<Shard> {
        self.current
            .borrow()
            .clone()
            .expect("a generation is installed before anything runs")
    }

    /// Switch to `config` (generation `generation`): build its TLS and schedulers, carry the
    /// state of what stays, set up what is new, and make it current. Nothing awaits here, so
    /// no request sees half of it.
    pub fn install(
        self: &Rc<Self>,
        config: Arc<Config>,
        generation: u64,
    ) -> Result<Rc<Shard>, String> {
        let tls = TlsParts::new(&config, &self.secrets, self.id == 0)?;
        let prev = self.current.borrow().clone();
        let load = &self.load;
        for rs in &config.servers {
            let before = prev.as_ref().and_then(|p| p.config.servers.get(rs.id.0));
            if rs.retired {
                if before.is_some_and(|b| !b.retired) {
                    self.pools.drop_server(rs.id);
                }
                continue;
            }
            match before.filter(|b| !b.retired) {
                // a weight the runtime API set stays; the config's follows the file
                Some(b) if load.weight(rs.id) != b.weight => {}
                _ => load.set_weight(rs.id, rs.weight),
            }
            let checked = config.pools[rs.pool]
                .health_check
                .as_ref()
                .is_some_and(|h| !h.initial_up);
            if checked && before.is_none_or(|b| b.retired) {
                load.set_checking(rs.id);
            }
        }
        load.set_in_use(config.servers.len());
        for p in &config.pools {
            if let Persistence::SourceIp { max_entries, .. } = p.persistence {
                let mut t = self.source_tables[p.slot].borrow_mut();
                if t.is_none() {
                    *t = Some(SourceTable::new(max_entries));
                }
            }
        }
        for vs in &config.services {
            let mut t = self.clients[vs.slot].borrow_mut();
            if vs.client_limits.is_some() && t.is_none() {
                *t = Some(ClientTable::new(100_000));
            }
        }
        self.metrics
            .set_in_use(config.slots.used_services, config.servers.len());
        let shard = Rc::new(Shard {
            state: self.clone(),
            generation,
            schedulers: config
                .pools
                .iter()
                .map(|p| Scheduler::new(p, &config.servers, self.id))
                .collect(),
            acceptors: tls.acceptors,
            connectors: tls.connectors,
            upstream_names: tls.upstream_names,
            admin_acceptor: tls.admin_acceptor,
            config,
        });
        *self.current.borrow_mut() = Some(shard.clone());
        self.generation.set(generation);
        Ok(shard)
    }

    /// The generation new requests use (cheap: read between requests).
    pub fn current_generation(&self) -> u64 {
        self.generation.get()
    }
}

impl State {
    pub fn metrics_snapshot(&self) -> MetricsSnapshot {
        let dropped = Kind::ALL.map(|k| self.log.dropped(k));
        self.metrics.snapshot(
            self.id,
            self.accepted.get(),
            self.lot.nr_parked() as u64,
            dropped,
        )
    }

    /// Apply an operator's change on this shard.
    pub fn apply_change(&self, change: mesh::AdminChange) {
        match change {
            mesh::AdminChange::State(id, state) => {
                self.load.set_admin_state(id, state);
                if state == crate::balance::AdminState::Maint {
                    self.pools.drop_server(id);
                }
            }
            mesh::AdminChange::Weight(id, w) => self.load.set_weight(id, w),
            mesh::AdminChange::Health(id, up) => self.load.set_up(id, up),
        }
    }

    fn admin_acked(&self, id: u64) {
        if let Some((_, n)) = self
            .admin_acks
            .borrow_mut()
            .iter_mut()
            .find(|(i, _)| *i == id)
        {
            *n += 1;
        }
    }

    /// Apply `change` here and on every other shard; returns once every shard has applied it
    /// (false if one has not acknowledged within a second), so the API answers with a state
    /// that every new request already sees.
    pub async fn apply_everywhere(&self, change: mesh::AdminChange) -> bool {
        self.apply_change(change);
        if self.nr_shards == 1 {
            return true;
        }
        let id = self.admin_changes.get() + 1;
        self.admin_changes.set(id);
        self.admin_acks.borrow_mut().push((id, 0));
        let me = self.id;
        self.tell_peers(|| mesh::MeshMsg::Admin {
            from: me,
            id,
            change,
        })
        .await;
        let deadline = Instant::now() + Duration::from_secs(1);
        let acked = || {
            self.admin_acks
                .borrow()
                .iter()
                .find(|(i, _)| *i == id)
                .map_or(0, |(_, n)| *n)
        };
        while acked() + 1 < self.nr_shards && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        let all = acked() + 1 >= self.nr_shards;
        self.admin_acks.borrow_mut().retain(|(i, _)| *i != id);
        all
    }

    /// A peer's answer to gather `id` (dropped when that gather has given up waiting).
    fn metrics_reply(&self, id: u64, snap: MetricsSnapshot) {
        let mut gathers = self.metrics_replies.borrow_mut();
        if let Some((_, replies)) = gathers.iter_mut().find(|(g, _)| *g == id) {
            replies.push(snap);
        }
    }

    /// Every shard's metrics, merged: own snapshot plus the peers' replies (those that answer
    /// within a second). Each gather has its own id and reply list, so overlapping scrapes
    /// never take each other's replies.
    pub async fn gather_metrics(&self) -> Merged {
        let id = self.metrics_query.get() + 1;
        self.metrics_query.set(id);
        self.metrics_replies.borrow_mut().push((id, Vec::new()));
        let me = self.id;
        self.tell_peers(|| mesh::MeshMsg::MetricsQuery { from: me, id })
            .await;
        let deadline = Instant::now() + Duration::from_secs(1);
        let answered = || {
            self.metrics_replies
                .borrow()
                .iter()
                .find(|(g, _)| *g == id)
                .map_or(0, |(_, r)| r.len())
        };
        while answered() + 1 < self.nr_shards && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        let mut all = {
            let mut gathers = self.metrics_replies.borrow_mut();
            match gathers.iter().position(|(g, _)| *g == id) {
                Some(i) => gathers.swap_remove(i).1,
                None => Vec::new(),
            }
        };
        if all.len() + 1 < self.nr_shards {
            tracing::warn!(
                answered = all.len() + 1,
                shards = self.nr_shards,
                "metrics gather: not every shard answered within 1s"
            );
        }
        all.push(self.metrics_snapshot());
        merge(all)
    }

    /// Log a diagnostic of a repetitive `kind` through `log`, unless this shard has logged
    /// `diag::BURST` of that kind this second (those are counted and reported with the next).
    pub fn diag(&self, kind: &'static str, log: impl FnOnce()) {
        match self
            .diag_limit
            .allow(kind, self.started.elapsed().as_secs())
        {
            None => {}
            Some(0) => log(),
            Some(n) => {
                tracing::warn!(suppressed = n, "{n} similar messages suppressed: {kind}");
                log();
            }
        }
    }

    /// An exchange with `id` got a response: its run of failures ends.
    pub fn upstream_ok(&self, id: ServerId) {
        let c = &self.passive[id.0];
        if c.get() != 0 {
            c.set(0);
        }
    }

    /// Buffer storage of `size` bytes: pooled when it is the standard size.
    pub fn take_storage(&self, size: usize) -> Box<[u8]> {
        if size == BUF_SIZE {
            if let Some(s) = self.storage.borrow_mut().pop() {
                return s;
            }
        }
        vec![0u8; size].into_boxed_slice()
    }

    /// Return storage to the pool (bounded: beyond it, memory goes back to the allocator).
    pub fn give_storage(&self, s: Box<[u8]>) {
        let mut pool = self.storage.borrow_mut();
        if s.len() == BUF_SIZE && pool.len() < STORAGE_POOL {
            pool.push(s);
        }
    }

    /// Working memory for a connection task (from the pool when there is some).
    pub fn take_workspace(&self) -> proxy::Workspace {
        self.workspaces.borrow_mut().pop().unwrap_or_default()
    }

    pub fn give_workspace(&self, ws: proxy::Workspace) {
        let mut pool = self.workspaces.borrow_mut();
        if pool.len() < WORKSPACE_POOL {
            pool.extend(ws.recycle());
        }
    }

    /// A bulk buffer for a large response, unless too many are out already.
    pub fn take_bulk(&self) -> Option<Box<[u8]>> {
        if self.nr_bulk.get() >= BULK_IN_USE {
            return None;
        }
        self.nr_bulk.set(self.nr_bulk.get() + 1);
        Some(
            self.bulk
                .borrow_mut()
                .pop()
                .unwrap_or_else(|| vec![0u8; BULK_SIZE].into_boxed_slice()),
        )
    }

    pub fn give_bulk(&self, b: Box<[u8]>) {
        self.nr_bulk.set(self.nr_bulk.get().saturating_sub(1));
        let mut pool = self.bulk.borrow_mut();
        if b.len() == BULK_SIZE && pool.len() < BULK_POOL {
            pool.push(b);
        }
    }

    /// Tell every other shard (no-op with one shard).
    pub async fn tell_peers(&self, make: impl Fn() -> mesh::MeshMsg) {
        let outbox = self.mesh.borrow().clone();
        if let Some(o) = outbox {
            o.broadcast(make).await;
        }
    }

    pub fn is_closing(&self) -> bool {
        self.closing.get()
    }

    /// Resolves once the shard starts shutting down.
    pub async fn closed(&self) {
        if !self.closing.get() {
            let _ = self.close_signal.acquire(1).await;
        }
    }

    fn begin_close(&self) {
        self.closing.set(true);
        self.close_signal.close();
        self.pools.clear();
    }

    pub fn nr_clients(&self) -> usize {
        self.nr_clients.get()
    }

    pub fn accepted_total(&self) -> u64 {
        self.accepted.get()
    }

    pub fn set_peer_accepted(&self, from: usize, n: u64) {
        if let Some(slot) = self.peer_accepted.borrow_mut().get_mut(from) {
            *slot = n;
        }
    }

    /// Accepted connections per shard: own exact, peers as last published.
    pub fn accepted_per_shard(&self) -> Vec<u64> {
        let mut v = self.peer_accepted.borrow().clone();
        if let Some(own) = v.get_mut(self.id) {
            *own = self.accepted.get();
        }
        v
    }
}

impl Shard {
    /// The connector and verified name for re-encrypting to `id`, if its service re-encrypts.
    pub fn upstream_tls(&self, id: ServerId) -> Option<(&TlsConnector, &ServerName<'static>)> {
        let v = self.config.pools[self.server(id).pool].service;
        match (&self.connectors[v], &self.upstream_names[id.0]) {
            (Some(c), Some(n)) => Some((c, n)),
            _ => None,
        }
    }

    pub fn server(&self, id: ServerId) -> &RealServer {
        &self.config.servers[id.0]
    }

    /// A connect failure or a reset before any response byte on `id`. After the service's
    /// `passive_fall` in a row (seen by this shard) the server is taken out at once, on every
    /// shard; its active check (or, without one, PASSIVE_RETRY) brings it back.
    pub fn upstream_failed(&self, id: ServerId) {
        let c = &self.passive[id.0];
        c.set(c.get().saturating_add(1));
        let vs = &self.config.services[self.config.pools[self.server(id).pool].service];
        if vs.passive_fall == 0
            || c.get() < vs.passive_fall
            || self.load.health(id) == crate::balance::Health::Down
        {
            return;
        }
        tracing::warn!(
            real_server = %self.server(id).name,
            failures = c.get(),
            "real server is down: consecutive connect failures or resets (passive health)"
        );
        c.set(0);
        let counter = &self.metrics.servers[id.0].passive_downs;
        counter.set(counter.get() + 1);
        self.passive_down(id);
        let outbox = self.mesh.borrow().clone();
        if let Some(o) = outbox {
            glommio::spawn_local(async move {
                o.broadcast(|| mesh::MeshMsg::PassiveDown { server: id.0 })
                    .await;
            })
            .detach();
        }
    }

    /// Take `id` out on this shard (passive health, here or on a peer).
    pub fn passive_down(&self, id: ServerId) {
        self.load.set_up(id, false);
        self.pools.drop_server(id);
        if self.config.pools[self.server(id).pool]
            .health_check
            .is_none()
        {
            let load = self.load.clone();
            glommio::spawn_local(async move {
                glommio::timer::sleep(PASSIVE_RETRY).await;
                if load.health(id) == crate::balance::Health::Down {
                    load.set_up(id, true);
                }
            })
            .detach();
        }
    }
}

/// Counts an admitted client connection (for the drain, the connection limits and the
/// per-client limits) until it ends, parked or not.
/// Counts by service slot: released against the same service whatever reloads happen.
pub struct ClientGuard {
    state: Rc<State>,
    slot: usize,
    ip: IpAddr,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let s = &self.state;
        s.nr_clients.set(s.nr_clients.get().saturating_sub(1));
        s.vs_conns[self.slot].set(s.vs_conns[self.slot].get().saturating_sub(1));
        if let Some(t) = s.clients[self.slot].borrow_mut().as_mut() {
            t.disconnect(self.ip);
        }
    }
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// This shard's share of an appliance-wide limit (0: none).
fn share(limit: u32, shards: usize) -> u32 {
    if limit == 0 {
        0
    } else {
        limit.div_ceil(shards as u32).max(1)
    }
}

impl Shard {
    /// Admit a new client connection of service `vs` from `peer`, or say which limit refuses it.
    fn admit(&self, vs: usize, peer: SocketAddr) -> Result<ClientGuard, (Limit, LimitAction)> {
        let svc = &self.config.services[vs];
        let slot = svc.slot;
        let own = self.config.runtime.shards[self.id].max_connections;
        let appliance = if own > 0 {
            own
        } else {
            share(self.config.runtime.max_connections, self.nr_shards)
        };
        if appliance > 0 && self.nr_clients.get() as u32 >= appliance {
            return Err((Limit::ApplianceConnections, LimitAction::Unavailable));
        }
        let service = share(svc.max_connections, self.nr_shards);
        if service > 0 && self.vs_conns[slot].get() >= service {
            return Err((Limit::ServiceConnections, LimitAction::Unavailable));
        }
        if let (Some(l), Some(t)) = (&svc.client_limits, self.clients[slot].borrow_mut().as_mut()) {
            t.connect(peer.ip(), unix_secs(), l)
                .map_err(|e| (e, l.action))?;
        }
        self.nr_clients.set(self.nr_clients.get() + 1);
        self.vs_conns[slot].set(self.vs_conns[slot].get() + 1);
        Ok(ClientGuard {
            state: self.state.clone(),
            slot,
            ip: peer.ip(),
        })
    }

    /// Count one more request from `peer` against its request rate.
    pub fn admit_request(&self, vs: usize, peer: SocketAddr) -> Result<(), (Limit, LimitAction)> {
        let svc = &self.config.services[vs];
        match (
            &svc.client_limits,
            self.clients[svc.slot].borrow_mut().as_mut(),
        ) {
            (Some(l), Some(t)) => t
                .request(peer.ip(), unix_secs(), l)
                .map_err(|e| (e, l.action)),
            _ => Ok(()),
        }
    }

    /// Count a connection refused by service `vs`'s access list, and put it in the security
    /// log once per address per interval.
    pub fn access_refused(&self, vs: usize, peer: SocketAddr) {
        let svc = &self.config.services[vs];
        let c = &self.metrics.services[svc.slot].access_refusals;
        c.set(c.get() + 1);
        if svc.logging.security
            && self
                .limit_log
                .borrow_mut()
                .should_log(peer.ip(), unix_secs())
        {
            self.log.security(&crate::log::SecurityRecord {
                client: peer,
                service: &svc.name,
                event: "access",
                reason: "client address not allowed",
                status: None,
                host: None,
                path: None,
            });
        }
    }

    /// Count a limit refusal, and put it in the security log once per client per interval.
    pub fn limit_refused(&self, vs: usize, peer: SocketAddr, limit: Limit) {
        let i = Limit::ALL.iter().position(|l| *l == limit).unwrap_or(0);
        let svc = &self.config.services[vs];
        let c = &self.metrics.services[svc.slot].limit_refusals[i];
        c.set(c.get() + 1);
        let log_now = match self.clients[svc.slot].borrow_mut().as_mut() {
            Some(t) => t.should_log(peer.ip(), unix_secs()),
            None => self
                .limit_log
                .borrow_mut()
                .should_log(peer.ip(), unix_secs()),
        };
        if log_now && svc.logging.security {
            self.log.security(&crate::log::SecurityRecord {
                client: peer,
                service: &svc.name,
                event: "limit",
                reason: limit.reason(),
                status: None,
                host: None,
                path: None,
            });
        }
    }
}

/// A session ticket's key changes this often (a ticket decrypts for one to two periods).
pub const TICKET_PERIOD: u64 = 6 * 3600;

/// Keys every shard shares read-only, made once before the shards start.
pub struct Secrets {
    /// Session tickets: a resumed TLS session may land on any shard.
    pub tickets: Arc<TicketKeys>,
    /// Signs persistence cookies: any shard honours any other's.
    pub cookie_key: [u8; 32],
}

impl Secrets {
    fn new(config: &Config) -> Result<Secrets, String> {
        let cookie_key = match config.runtime.persistence_key {
            Some(k) => k,
            None => {
                let mut k = [0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k)
                    .map_err(|_| "no randomness for the persistence key".to_string())?;
                k
            }
        };
        Ok(Secrets {
            tickets: TicketKeys::new(TICKET_PERIOD, config.runtime.ticket_keys.as_deref())?,
            cookie_key,
        })
    }
}

/// What the main thread tells a shard.
enum Cmd {
    /// Switch to this configuration and start serving these new sockets.
    Install {
        config: Arc<Config>,
        generation: u64,
        sockets: Vec<(SocketAddr, OwnedFd)>,
        admin: Option<OwnedFd>,
    },
    /// What a new process must start from (binary upgrade): every live real server's health,
    /// operator state and weight, by key.
    Export(mpsc::Sender<Export>),
}

/// What a shard hands over in a binary upgrade.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Export {
    /// Every live real server (from shard 0: the same on every shard).
    pub servers: Vec<ServerExport>,
    /// This shard's source-IP persistence entries.
    pub source: Vec<SourceExport>,
}

/// A source-IP persistence entry: `ip` sticks to the server `server` (a key) of `pool`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SourceExport {
    pub pool: String,
    pub ip: IpAddr,
    pub server: String,
    pub remaining_ms: u64,
}

/// A source-IP entry to start with: pool slot, address, server, time left.
pub type SourceSeed = (usize, IpAddr, ServerId, Duration);

/// A real server's runtime state, handed to the process that replaces this one.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ServerExport {
    pub key: String,
    /// Its weight in the configuration (a different `weight` was set by the runtime API).
    pub config_weight: u32,
    /// None: not checked yet.
    pub up: Option<bool>,
    pub state: crate::balance::AdminState,
    pub weight: u32,
}

/// Running shards, as seen from the main thread.
pub struct Running {
    handles: Vec<glommio::ExecutorJoinHandle<()>>,
    stop: Arc<AtomicBool>,
    cmds: Vec<mpsc::Sender<Cmd>>,
    replies: mpsc::Receiver<Result<usize, String>>,
    pub sockets: sockets::Sockets,
    pub secrets: Arc<Secrets>,
    config: Arc<Config>,
    generation: u64,
}

impl Running {
    /// Ask every shard to stop accepting and drain. The main thread's copies of the
    /// listening sockets close too: once the shards' close, the kernel refuses new
    /// connections (unless a new process holds them: after an upgrade it serves them).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.sockets = Default::default();
    }

    /// Wait for every shard to finish draining.
    pub fn join(self) {
        for h in self.handles {
            let _ = h.join();
        }
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every live real server's runtime state (as shard 0 sees it) and every shard's
    /// source-IP persistence entries.
    pub fn export(&self) -> Result<Export, String> {
        let mut all = Export::default();
        for (i, cmd) in self.cmds.iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            cmd.send(Cmd::Export(tx))
                .map_err(|_| format!("shard {i} is not running"))?;
            let e = rx
                .recv_timeout(Duration::from_secs(10))
                .map_err(|_| format!("shard {i} did not answer within 10s"))?;
            if i == 0 {
                all.servers = e.servers;
            }
            all.source.extend(e.source);
        }
        Ok(all)
    }

    /// Switch every shard to `config` (already validated and renumbered to follow the
    /// current one): bind its new listeners, check its TLS, then tell every shard and wait
    /// until each has switched. Err: nothing changed (or, if a shard failed to switch, which
    /// one and why: the others already serve the new one).
    pub fn reload(&mut self, config: Config) -> Result<u64, String> {
        // what a shard could refuse, refused here first: then every shard switches
        TlsParts::new(&config, &self.secrets, true)?;
        let config = Arc::new(config);
        let plan = self.sockets.plan(&config)?;
        let generation = self.generation + 1;
        self.send_all(&config, generation, plan)?;
        self.config = config;
        self.generation = generation;
        Ok(generation)
    }

    fn send_all(
        &self,
        config: &Arc<Config>,
        generation: u64,
        plan: sockets::Plan,
    ) -> Result<(), String> {
        let mut admin = plan.admin;
        for (i, sockets) in plan.per_shard.into_iter().enumerate() {
            let cmd = Cmd::Install {
                config: config.clone(),
                generation,
                sockets,
                admin: if i == 0 { admin.take() } else { None },
            };
            self.cmds[i]
                .send(cmd)
                .map_err(|_| format!("shard {i} is not running"))?;
        }
        let mut errors = Vec::new();
        for _ in 0..self.cmds.len() {
            match self.replies.recv_timeout(Duration::from_secs(30)) {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => errors.push(e),
                Err(_) => errors.push("a shard did not answer within 30s".into()),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// Start one shard per configured core. Returns once every shard serves, or with the first
/// error (the caller exits: no half-working proxy). `sockets` and `secrets`: those of the
/// process this one replaces (binary upgrade), and `generation` goes on from its own.
pub fn start(
    config: Arc<Config>,
    log: Arc<LogWriter>,
    changes: Vec<mesh::AdminChange>,
    seeds: Vec<SourceSeed>,
    mut sockets: sockets::Sockets,
    secrets: Option<Secrets>,
    generation: u64,
) -> Result<Running, String> {
    let changes = Arc::new((changes, seeds));
    let nr_shards = config.runtime.cores.len();
    let mesh = mesh::new_mesh(nr_shards);
    let secrets = Arc::new(match secrets {
        Some(s) => s,
        None => Secrets::new(&config)?,
    });
    TlsParts::new(&config, &secrets, true)?;
    let plan = sockets.plan(&config)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<usize, String>>();
    let mut handles = Vec::new();
    let mut cmds = Vec::new();
    for id in 0..nr_shards {
        let settings = &config.runtime.shards[id];
        let mut builder = LocalExecutorBuilder::new(Placement::Fixed(settings.core))
            .name(&format!("shard-{id}"))
            .io_memory(settings.io_memory)
            .ring_depth(settings.ring_depth);
        if let Some(spin) = settings.spin_before_park {
            builder = builder.spin_before_park(spin);
        }
        let core = settings.core;
        let (tx, rx) = mpsc::channel::<Cmd>();
        cmds.push(tx);
        let (config, mesh, stop, ready_tx, secrets) = (
            config.clone(),
            mesh.clone(),
            stop.clone(),
            ready_tx.clone(),
            secrets.clone(),
        );
        let (log, changes) = (log.clone(), changes.clone());
        let handle = builder
            .spawn(move || async move {
                run_shard(id, config, secrets, log, &changes, mesh, stop, rx, ready_tx).await
            })
            .map_err(|e| format!("shard {id}: cannot start executor on CPU {core}: {e}"))?;
        handles.push(handle);
    }
    drop(ready_tx);
    let running = Running {
        handles,
        stop,
        cmds,
        replies: ready_rx,
        sockets,
        secrets,
        config: config.clone(),
        generation,
    };
    if let Err(e) = running.send_all(&config, generation, plan) {
        let mut running = running;
        running.stop();
        return Err(e);
    }
    Ok(running)
}

#[allow(clippy::too_many_arguments)]
async fn run_shard(
    id: usize,
    config: Arc<Config>,
    secrets: Arc<Secrets>,
    log: Arc<LogWriter>,
    (changes, seeds): &(Vec<mesh::AdminChange>, Vec<SourceSeed>),
    mesh: mesh::Mesh,
    stop: Arc<AtomicBool>,
    cmds: mpsc::Receiver<Cmd>,
    replies: mpsc::Sender<Result<usize, String>>,
) {
    if let Err(e) = net::start_poller(id, config.runtime.shards[id].poll_before_park) {
        let _ = replies.send(Err(format!("shard {id}: cannot create its poller: {e}")));
        return;
    }
    let state = Rc::new(State::new(id, &config, secrets, log));
    let mut started = false;
    // Shutdown comes from the main thread's signal wait as a flag; configurations as commands.
    while !stop.load(Ordering::SeqCst) {
        while let Ok(cmd) = cmds.try_recv() {
            let (config, generation, sockets, admin) = match cmd {
                Cmd::Install {
                    config,
                    generation,
                    sockets,
                    admin,
                } => (config, generation, sockets, admin),
                Cmd::Export(reply) => {
                    let _ = reply.send(export(&state));
                    continue;
                }
            };
            let r = match state.install(config, generation) {
                Ok(shard) => {
                    if !started {
                        started = true;
                        // runtime changes kept in the state file or handed over by the
                        // process this one replaces: on every shard before any request
                        for c in changes {
                            state.apply_change(*c);
                        }
                        let now = Instant::now();
                        for &(pool, ip, id, left) in seeds {
                            if let Some(t) = state.source_tables[pool].borrow_mut().as_mut() {
                                t.put(ip, id, now, left);
                            }
                        }
                        // the mesh first: health results must reach every shard
                        start_tasks(&state, mesh.clone()).await;
                    }
                    serve(&state, &shard, sockets, admin)
                }
                Err(e) => Err(e),
            };
            let failed = r.is_err();
            let _ = replies.send(r.map(|_| id).map_err(|e| format!("shard {id}: {e}")));
            if failed && !started {
                return;
            }
        }
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    state.begin_close();
    // the drain time of the configuration serving now (a reload may have changed it)
    let drain = state
        .current
        .borrow()
        .as_ref()
        .map_or(config.runtime.drain_timeout, |s| {
            s.config.runtime.drain_timeout
        });
    let deadline = Instant::now() + drain;
    while state.nr_clients() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    if state.nr_clients() > 0 {
        tracing::warn!(
            shard = id,
            open = state.nr_clients(),
            "drain time over: closing remaining connections"
        );
    }
    state.log.flush_all();
}

fn export(state: &State) -> Export {
    use crate::balance::Health;
    let shard = state.current();
    let now = Instant::now();
    let mut source = Vec::new();
    for p in &shard.config.pools {
        if let Some(t) = state.source_tables[p.slot].borrow().as_ref() {
            for (ip, id, left) in t.live(now) {
                if let Some(rs) = shard.config.servers.get(id.0).filter(|rs| !rs.retired) {
                    source.push(SourceExport {
                        pool: p.name.clone(),
                        ip,
                        server: rs.key.clone(),
                        remaining_ms: left.as_millis() as u64,
                    });
                }
            }
        }
    }
    let servers = shard
        .config
        .live_servers()
        .map(|rs| ServerExport {
            key: rs.key.clone(),
            config_weight: rs.weight,
            up: match state.load.health(rs.id) {
                Health::Checking => None,
                h => Some(h == Health::Up),
            },
            state: state.load.admin_state(rs.id),
            weight: state.load.weight(rs.id),
        })
        .collect();
    Export { servers, source }
}

/// The shard's long-lived tasks, once its first generation is installed.
async fn start_tasks(state: &Rc<State>, mesh: mesh::Mesh) {
    let id = state.id;
    if state.nr_shards > 1 {
        mesh::start(state.clone(), mesh).await;
    }
    crate::runtime::supervise(id, "parking lot", crate::client::run_lot(state.clone()));
    // Hand buffered log records to the writer regularly, not only when a buffer fills.
    let flusher = state.clone();
    crate::runtime::supervise(id, "log flusher", async move {
        loop {
            glommio::timer::sleep(crate::log::FLUSH_EVERY).await;
            flusher.log.flush_all();
        }
    });
}

/// With `shard` current: serve the new sockets, stop serving addresses it no longer has
/// (after their queues drain), and check the servers it newly checks.
fn serve(
    state: &Rc<State>,
    shard: &Rc<Shard>,
    sockets: Vec<(SocketAddr, OwnedFd)>,
    admin: Option<OwnedFd>,
) -> Result<(), String> {
    let mut listeners = Vec::new();
    for (addr, fd) in sockets {
        // SAFETY: a listening socket's fd, owned from here on.
        let sk = unsafe { socket2::Socket::from_raw_fd(fd.into_raw_fd()) };
        let l = net::Listener::new(sk).map_err(|e| format!("cannot serve {addr}: {e}"))?;
        listeners.push((addr, l));
    }
    let serves = |addr: SocketAddr| {
        let settings = &shard.config.runtime.shards[state.id];
        shard
            .config
            .services
            .iter()
            .enumerate()
            .any(|(v, vs)| vs.listen == addr && settings.services.contains(&v))
    };
    state.listeners.borrow_mut().retain(|(addr, stop)| {
        let keep = serves(*addr);
        if !keep {
            stop.close();
        }
        keep
    });
    for (addr, l) in listeners {
        let stop = Rc::new(Semaphore::new(0));
        state.listeners.borrow_mut().push((addr, stop.clone()));
        crate::runtime::supervise(
            state.id,
            "accept",
            accept_loop(state.clone(), addr, l, stop),
        );
    }
    if let Some(fd) = admin {
        // SAFETY: the fd of a bound, listening socket whose ownership moves to glommio.
        let l = unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) };
        crate::runtime::supervise(state.id, "admin", admin::accept_loop(state.clone(), l));
    }
    crate::health::start(shard);
    Ok(())
}

/// Accept on one listening socket until shutdown, or until the configuration no longer has
/// its address: then what is already in its queue is accepted and served (by the last
/// configuration that had it) before the socket closes.
async fn accept_loop(
    state: Rc<State>,
    addr: SocketAddr,
    listener: net::Listener,
    stop: Rc<Semaphore>,
) {
    let mut last: Option<Rc<Shard>> = None;
    let mut draining = false;
    loop {
        let accepted = if draining {
            match futures_lite::future::poll_once(listener.accept()).await {
                Some(r) => Some(r),
                None => return, // queue empty: the socket closes
            }
        } else {
            futures_lite::future::or(async { Some(listener.accept().await) }, async {
                futures_lite::future::or(state.closed(), async {
                    let _ = stop.acquire(1).await;
                })
                .await;
                None
            })
            .await
        };
        let (stream, peer) = match accepted {
            None if state.is_closing() => return,
            None => {
                draining = true;
                continue;
            }
            Some(Ok(s)) => s,
            Some(Err(_)) if draining => return,
            Some(Err(e)) => {
                // Out of file descriptors and the like: back off instead of spinning.
                state.diag("accept failed", || {
                    tracing::warn!(shard = state.id, "accept failed: {e}")
                });
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        state.accepted.set(state.accepted.get() + 1);
        let current = state.current();
        let shard = match current
            .config
            .services
            .iter()
            .position(|s| s.listen == addr)
        {
            Some(vs) => {
                last = Some(current.clone());
                (current, vs)
            }
            None => match last.clone().and_then(|l| {
                let vs = l.config.services.iter().position(|s| s.listen == addr)?;
                Some((l, vs))
            }) {
                Some(x) => x,
                None => continue, // never ours (cannot happen): the socket closes
            },
        };
        let (shard, vs) = shard;
        accepted_connection(shard, vs, stream, peer);
    }
}

/// A connection accepted for service `vs`: access list, limits, then its task.
fn accepted_connection(shard: Rc<Shard>, vs: usize, stream: net::Socket, peer: SocketAddr) {
    if let Some(acl) = &shard.config.services[vs].access {
        if !acl.permits(peer.ip()) {
            // Refused before TLS and before any byte is read: the socket just closes.
            shard.access_refused(vs, peer);
            return;
        }
    }
    let guard = match shard.admit(vs, peer) {
        Ok(g) => g,
        Err((limit, action)) => {
            shard.limit_refused(vs, peer, limit);
            // A plain-HTTP client is told why (unless told to drop); a TLS one is closed.
            let status = match action {
                LimitAction::TooManyRequests => Some(429),
                LimitAction::Unavailable => Some(503),
                LimitAction::Drop => None,
            };
            // Bounded: a flood of refused connections must not become a flood of tasks
            // holding sockets; beyond the bound they are closed at once.
            let refusing = shard.refusing.get();
            if let (Some(status), None, true) =
                (status, &shard.acceptors[vs], refusing < MAX_REFUSING)
            {
                shard.refusing.set(refusing + 1);
                let shard = shard.clone();
                glommio::spawn_local(async move {
                    let mut stream = stream;
                    crate::io::respond_and_close(
                        &mut stream,
                        crate::http::canned::error_response(status),
                    )
                    .await;
                    shard.refusing.set(shard.refusing.get() - 1);
                })
                .detach();
            }
            return;
        }
    };
    let facts = ConnFacts {
        vs_idx: vs,
        vs_slot: shard.config.services[vs].slot,
        generation: shard.generation,
        peer,
        proto: "http",
        sni: None,
        tls: None,
        opened: Instant::now(),
        requests: 0,
        bytes_in: 0,
        bytes_out: 0,
    };
    let shard = shard.clone();
    match shard.acceptors[vs].clone() {
        None => {
            client::opened(&shard, &facts);
            let c = Client {
                stream: ClientStream::Plain(stream),
                facts,
                guard,
            };
            spawn_connection(peer, Box::pin(proxy::serve(shard, c)));
        }
        // The handshake's state lives in its own allocation, gone once it is done.
        Some(acceptor) => spawn_connection(
            peer,
            Box::pin(serve_tls(shard, acceptor, stream, facts, guard)),
        ),
    }
}

/// Run a client connection's task. Defence in depth: a bug that panics must cost one
/// connection, not the shard. The task comes boxed: a connection gets a task again each
/// time it leaves the parking lot, and moving a pointer is cheaper than moving its state.
pub fn spawn_connection(
    peer: SocketAddr,
    task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'static>>,
) {
    glommio::spawn_local(async move {
        use futures_lite::FutureExt;
        if std::panic::AssertUnwindSafe(task)
            .catch_unwind()
            .await
            .is_err()
        {
            tracing::error!(client = %peer, "connection task panicked (bug): connection dropped");
        }
    })
    .detach();
}

/// Complete a TLS handshake (bounded), then serve the connection.
async fn serve_tls(
    shard: Rc<Shard>,
    acceptor: TlsAcceptor,
    stream: net::Socket,
    mut facts: ConnFacts,
    guard: ClientGuard,
) {
    let (vs, peer) = (facts.vs_idx, facts.peer);
    let limit = shard.config.services[vs]
        .tls
        .as_ref()
        .map(|t| t.handshake_timeout);
    let limit = limit.unwrap_or(Duration::from_secs(10));
    let counters = &shard.metrics.services[vs];
    match crate::io::timeout(limit, acceptor.accept(stream)).await {
        Ok(tls) => {
            counters
                .tls_handshakes
                .set(counters.tls_handshakes.get() + 1);
            let session = tls.get_ref().1;
            if session.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                counters.tls_resumed.set(counters.tls_resumed.get() + 1);
            }
            facts.sni = session.server_name().map(Box::from);
            facts.tls = match session.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => Some("TLSv1.3"),
                Some(rustls::ProtocolVersion::TLSv1_2) => Some("TLSv1.2"),
                _ => None,
            };
            facts.proto = "https";
            client::opened(&shard, &facts);
            let c = Client {
                stream: ClientStream::Tls(Box::new(tls)),
                facts,
                guard,
            };
            proxy::serve(shard, c).await
        }
        Err(e) => {
            counters.tls_failures.set(counters.tls_failures.get() + 1);
            let service = &shard.config.services[vs];
            shard.diag("TLS handshake failed", || {
                tracing::info!(client = %peer, service = %service.name, "TLS handshake failed: {e}")
            });
            if service.logging.security {
                let reason = e.to_string();
                shard.log.security(&crate::log::SecurityRecord {
                    client: peer,
                    service: &service.name,
                    event: "tls_handshake",
                    reason: &reason,
                    status: None,
                    host: None,
                    path: None,
                });
            }
        }
    }
}
