//! Shards: one pinned glommio executor per configured core. A shard's lasting `State`
//! (listeners' parking lot, buffers, counters, connection counts, the load view, persistence
//! tables: per service, pool and server slot) outlives configurations; `Shard` is one
//! configuration generation on it (config, TLS, schedulers), held by the requests that use it.
//! Start-up, reloads and the drain are in `run`, new connections in `accept`.

pub mod accept;
pub mod mesh;
mod run;
pub mod sockets;

pub use accept::{spawn_connection, ClientGuard};
pub use run::{start, Export, Running, ServerExport, SourceExport, SourceSeed};

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
    /// The admin shard's 15-minute history (None elsewhere).
    pub history: RefCell<Option<crate::admin::history::History>>,
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
    /// Connections waiting for their PROXY header (at most MAX_PROXY_WAITING).
    proxy_waiting: Cell<usize>,
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
    /// Accept loops running: the drain starts once none is left, so that no connection is
    /// accepted after the drain has counted (its task would never run).
    pub(crate) accepting: Cell<usize>,
    /// Who holds each service, pool and server slot (name, name, key): a slot a reload gives
    /// to someone new starts from zero (counters, tables, operator state).
    holders: RefCell<[Vec<Option<String>>; 3]>,
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
/// Connections a shard lets wait for a PROXY header at once: they are not admitted yet (the
/// limits need the client's address), so a silent flood must not hold sockets unbounded.
const MAX_PROXY_WAITING: usize = 1024;

/// Without an active health check, a server taken out by passive health is tried again after
/// this long (nginx's fail_timeout).
pub const PASSIVE_RETRY: Duration = Duration::from_secs(10);

/// One health-check outcome, for /status.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub ok: bool,
    pub at_unix_ms: u64,
    pub detail: String,
    /// How long the check took.
    pub latency_ms: f64,
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
            proxy_waiting: Cell::new(0),
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
            history: RefCell::new(None),
            metrics_query: Cell::new(0),
            metrics_replies: RefCell::new(Vec::new()),
            secrets,
            current: RefCell::new(None),
            checking: RefCell::new(vec![false; slots.servers]),
            generation: Cell::new(0),
            listeners: RefCell::new(Vec::new()),
            accepting: Cell::new(0),
            holders: RefCell::new([
                vec![None; slots.services],
                vec![None; slots.pools],
                vec![None; slots.servers],
            ]),
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
        self.take_slots(&config);
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
            if before.is_some_and(|b| b.retired) {
                // removed earlier, back now: it starts afresh, as a new server would
                load.set_admin_state(rs.id, crate::balance::AdminState::Ready);
                self.passive[rs.id.0].set(0);
                self.metrics.reset_server(rs.id.0);
            }
            if checked && before.is_none_or(|b| b.retired) {
                load.set_checking(rs.id);
            }
            // its check removed: health is no longer known from checks; up, as at a start
            // without one (passive health still takes it out if it fails)
            let was_checked = before.filter(|b| !b.retired).is_some_and(|b| {
                prev.as_ref()
                    .is_some_and(|p| p.config.pools[b.pool].health_check.is_some())
            });
            if was_checked && config.pools[rs.pool].health_check.is_none() {
                load.set_up(rs.id, true);
                self.checks.borrow_mut()[rs.id.0] = None;
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

    /// Slots `config` gives to someone other than their last holder start from zero.
    fn take_slots(&self, config: &Config) {
        let mut h = self.holders.borrow_mut();
        let [services, pools, servers] = &mut *h;
        for vs in &config.services {
            if services[vs.slot].as_deref() != Some(vs.name.as_str()) {
                if services[vs.slot].is_some() {
                    self.metrics.reset_service(vs.slot);
                    *self.clients[vs.slot].borrow_mut() = None;
                }
                services[vs.slot] = Some(vs.name.clone());
            }
        }
        for p in &config.pools {
            if pools[p.slot].as_deref() != Some(p.name.as_str()) {
                *self.source_tables[p.slot].borrow_mut() = None;
                pools[p.slot] = Some(p.name.clone());
            }
        }
        for rs in config.live_servers() {
            let id = rs.id;
            if servers[id.0].as_deref() != Some(rs.key.as_str()) {
                if servers[id.0].is_some() {
                    // the place of a removed server: nothing of it carries over
                    self.metrics.reset_server(id.0);
                    self.passive[id.0].set(0);
                    self.checks.borrow_mut()[id.0] = None;
                    self.load
                        .set_admin_state(id, crate::balance::AdminState::Ready);
                    self.load.set_up(id, true);
                    self.load.clear_up_since(id);
                }
                servers[id.0] = Some(rs.key.clone());
            }
        }
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
