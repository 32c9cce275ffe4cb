//! Shards: one pinned glommio executor per configured core, each owning its listeners, its
//! upstream pools, its schedulers and its half of the load view. Start-up is all-or-nothing;
//! shutdown stops accepting, drains in-flight requests for a bounded time, then returns.

pub mod mesh;

use crate::admin;
use crate::balance::persist::{CookieSigner, SourceTable};
use crate::balance::{LoadView, Scheduler};
use crate::client::{self, Client, ClientStream, ConnFacts};
use crate::config::LimitAction;
use crate::config::{Config, Persistence, RealServer, ServerId, Steering};
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

/// Everything one shard owns. `!Send`: it never leaves its executor.
pub struct Shard {
    pub id: usize,
    pub nr_shards: usize,
    pub core: usize,
    pub config: Arc<Config>,
    pub load: Rc<LoadView>,
    pub pools: Pools,
    /// One per pool (`config.pools`), in config order.
    pub schedulers: Vec<Scheduler>,
    /// Per pool with source-IP persistence: this shard's table.
    pub source_tables: Vec<Option<RefCell<SourceTable>>>,
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
    /// Client connections per virtual service.
    vs_conns: Vec<Cell<u32>>,
    /// Per virtual service with client limits: this shard's clients.
    clients: Vec<Option<RefCell<ClientTable>>>,
    /// When each address was last security-logged for a service/appliance limit.
    limit_log: RefCell<ClientTable>,
    accepted: Cell<u64>,
    peer_accepted: RefCell<Vec<u64>>,
    pub started: Instant,
    /// Per virtual service: the TLS acceptor of a service that terminates TLS.
    acceptors: Vec<Option<TlsAcceptor>>,
    /// Per virtual service: the connector of a service that re-encrypts.
    pub connectors: Vec<Option<TlsConnector>>,
    /// Per ServerId: the name its certificate is verified against (re-encryption only).
    upstream_names: Vec<Option<ServerName<'static>>>,
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
    /// HTTPS on the admin listener (shard 0, when `[admin] tls` is set).
    pub admin_acceptor: Option<TlsAcceptor>,
    /// Operator changes sent from this shard: id, and the peers that acknowledged it.
    admin_changes: Cell<u64>,
    admin_acks: RefCell<Vec<(u64, usize)>>,
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

impl Shard {
    pub fn new(
        id: usize,
        config: Arc<Config>,
        secrets: &Secrets,
        log: Arc<LogWriter>,
        changes: &[mesh::AdminChange],
    ) -> Result<Shard, String> {
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
            let vs = &config.services[config.pools[rs.pool].service];
            upstream_names.push(match &vs.reencrypt {
                Some(r) => Some(tls::upstream_name(r, &rs.name)?),
                None => None,
            });
        }
        let admin_acceptor = match config.admin.as_ref().and_then(|a| a.tls.as_ref()) {
            Some(t) if id == 0 => Some(TlsAcceptor::from(tls::server_config(
                t,
                secrets.tickets.clone(),
            )?)),
            _ => None,
        };
        let nr_shards = config.runtime.cores.len();
        let load = Rc::new(LoadView::new(id, nr_shards, config.nr_servers));
        for rs in &config.servers {
            load.set_weight(rs.id, rs.weight);
        }
        // runtime changes kept in the state file, the same on every shard from the start
        for c in changes {
            match *c {
                mesh::AdminChange::State(id, s) => load.set_admin_state(id, s),
                mesh::AdminChange::Weight(id, w) => load.set_weight(id, w),
            }
        }
        for pool in &config.pools {
            if pool.health_check.as_ref().is_some_and(|h| !h.initial_up) {
                for &s in &pool.servers {
                    load.set_checking(s);
                }
            }
        }
        Ok(Shard {
            acceptors,
            connectors,
            upstream_names,
            id,
            nr_shards,
            core: config.runtime.cores[id],
            load,
            passive: (0..config.nr_servers).map(|_| Cell::new(0)).collect(),
            diag_limit: Default::default(),
            refusing: Cell::new(0),
            admin_acceptor,
            admin_changes: Cell::new(0),
            admin_acks: RefCell::new(Vec::new()),
            pools: Pools::new(config.nr_servers),
            schedulers: config
                .pools
                .iter()
                .map(|p| Scheduler::new(p, &config.servers, id))
                .collect(),
            source_tables: config
                .pools
                .iter()
                .map(|p| match p.persistence {
                    Persistence::SourceIp { max_entries, .. } => {
                        Some(RefCell::new(SourceTable::new(max_entries)))
                    }
                    _ => None,
                })
                .collect(),
            cookies: CookieSigner::new(&secrets.cookie_key),
            checks: RefCell::new(vec![None; config.nr_servers]),
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
            vs_conns: config.services.iter().map(|_| Cell::new(0)).collect(),
            clients: config
                .services
                .iter()
                .map(|vs| {
                    vs.client_limits
                        .map(|_| RefCell::new(ClientTable::new(100_000)))
                })
                .collect(),
            limit_log: RefCell::new(ClientTable::new(10_000)),
            accepted: Cell::new(0),
            peer_accepted: RefCell::new(vec![0; nr_shards]),
            started: Instant::now(),
            mesh: RefCell::new(None),
            log: ShardLog::new(log),
            metrics: ShardMetrics::new(&config),
            metrics_query: Cell::new(0),
            metrics_replies: RefCell::new(Vec::new()),
            config,
        })
    }

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

    /// An exchange with `id` got a response: its run of failures ends.
    pub fn upstream_ok(&self, id: ServerId) {
        let c = &self.passive[id.0];
        if c.get() != 0 {
            c.set(0);
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

/// Counts an admitted client connection (for the drain, the connection limits and the
/// per-client limits) until it ends, parked or not.
pub struct ClientGuard {
    shard: Rc<Shard>,
    vs: usize,
    ip: IpAddr,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let s = &self.shard;
        s.nr_clients.set(s.nr_clients.get().saturating_sub(1));
        s.vs_conns[self.vs].set(s.vs_conns[self.vs].get().saturating_sub(1));
        if let Some(t) = &s.clients[self.vs] {
            t.borrow_mut().disconnect(self.ip);
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
    fn admit(
        self: &Rc<Self>,
        vs: usize,
        peer: SocketAddr,
    ) -> Result<ClientGuard, (Limit, LimitAction)> {
        let svc = &self.config.services[vs];
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
        if service > 0 && self.vs_conns[vs].get() >= service {
            return Err((Limit::ServiceConnections, LimitAction::Unavailable));
        }
        if let (Some(l), Some(t)) = (&svc.client_limits, &self.clients[vs]) {
            t.borrow_mut()
                .connect(peer.ip(), unix_secs(), l)
                .map_err(|e| (e, l.action))?;
        }
        self.nr_clients.set(self.nr_clients.get() + 1);
        self.vs_conns[vs].set(self.vs_conns[vs].get() + 1);
        Ok(ClientGuard {
            shard: self.clone(),
            vs,
            ip: peer.ip(),
        })
    }

    /// Count one more request from `peer` against its request rate.
    pub fn admit_request(&self, vs: usize, peer: SocketAddr) -> Result<(), (Limit, LimitAction)> {
        let svc = &self.config.services[vs];
        match (&svc.client_limits, &self.clients[vs]) {
            (Some(l), Some(t)) => t
                .borrow_mut()
                .request(peer.ip(), unix_secs(), l)
                .map_err(|e| (e, l.action)),
            _ => Ok(()),
        }
    }

    /// Count a connection refused by service `vs`'s access list, and put it in the security
    /// log once per address per interval.
    pub fn access_refused(&self, vs: usize, peer: SocketAddr) {
        let c = &self.metrics.services[vs].access_refusals;
        c.set(c.get() + 1);
        let svc = &self.config.services[vs];
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
        let c = &self.metrics.services[vs].limit_refusals[i];
        c.set(c.get() + 1);
        let svc = &self.config.services[vs];
        let log_now = match &self.clients[vs] {
            Some(t) => t.borrow_mut().should_log(peer.ip(), unix_secs()),
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
            tickets: TicketKeys::new(6 * 3600, config.runtime.ticket_keys.as_deref())?,
            cookie_key,
        })
    }
}

/// Running shards, as seen from the main thread.
pub struct Running {
    handles: Vec<glommio::ExecutorJoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Running {
    /// Ask every shard to stop accepting and drain.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Wait for every shard to finish draining.
    pub fn join(self) {
        for h in self.handles {
            let _ = h.join();
        }
    }
}

/// Start one shard per configured core. Returns once every shard has bound its listeners,
/// or with the first error (the caller exits: no half-working proxy).
pub fn start(
    config: Arc<Config>,
    log: Arc<LogWriter>,
    changes: Vec<mesh::AdminChange>,
) -> Result<Running, String> {
    let changes = Arc::new(changes);
    let nr_shards = config.runtime.cores.len();
    let mesh = mesh::new_mesh(nr_shards);
    let secrets = Arc::new(Secrets::new(&config)?);
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<usize, String>>();
    let mut handles = Vec::new();
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
                run_shard(id, config, secrets, log, &changes, mesh, stop, ready_tx).await
            })
            .map_err(|e| format!("shard {id}: cannot start executor on CPU {core}: {e}"))?;
        handles.push(handle);
    }
    drop(ready_tx);
    for _ in 0..nr_shards {
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("a shard did not start within 30s".into()),
        }
    }
    Ok(Running { handles, stop })
}

#[allow(clippy::too_many_arguments)]
async fn run_shard(
    id: usize,
    config: Arc<Config>,
    secrets: Arc<Secrets>,
    log: Arc<LogWriter>,
    changes: &[mesh::AdminChange],
    mesh: mesh::Mesh,
    stop: Arc<AtomicBool>,
    ready: mpsc::Sender<Result<usize, String>>,
) {
    let shard = match Shard::new(id, config.clone(), &secrets, log, changes) {
        Ok(s) => Rc::new(s),
        Err(e) => {
            let _ = ready.send(Err(format!("shard {id}: {e}")));
            return;
        }
    };
    // Bind everything first: a failure is reported before anything serves.
    if let Err(e) = net::start_poller(id, config.runtime.shards[id].poll_before_park) {
        let _ = ready.send(Err(format!("shard {id}: cannot create its poller: {e}")));
        return;
    }
    let mut listeners: Vec<(usize, net::Listener)> = Vec::new();
    let settings = &config.runtime.shards[id];
    for (v, vs) in config.services.iter().enumerate() {
        if !settings.services.contains(&v) {
            continue; // this core does not serve it
        }
        // the BPF program picks among the sockets of the shards that serve this service
        let steer = match vs.shard_steering {
            Steering::SourceIp => Some(config.runtime.shards_serving(v) as u32),
            Steering::Kernel => None,
        };
        match net::bind(vs.listen, settings.backlog, steer).and_then(net::Listener::new) {
            Ok(l) => listeners.push((v, l)),
            Err(e) => {
                let _ = ready.send(Err(format!(
                    "shard {id}: cannot listen on {} for virtual service {:?}: {e}",
                    vs.listen, vs.name
                )));
                return;
            }
        }
    }
    let admin_listener = match (&config.admin, id) {
        (Some(a), 0) => match net::bind(a.listen, 128, None) {
            // SAFETY: the fd of a bound, listening socket whose ownership moves to glommio.
            Ok(l) => Some(unsafe { TcpListener::from_raw_fd(l.into_raw_fd()) }),
            Err(e) => {
                let _ = ready.send(Err(format!(
                    "cannot listen on {} for the admin endpoint: {e}",
                    a.listen
                )));
                return;
            }
        },
        _ => None,
    };
    let _ = ready.send(Ok(id));
    drop(ready);

    if shard.nr_shards > 1 {
        mesh::start(shard.clone(), mesh).await;
    }
    for (v, listener) in listeners {
        crate::runtime::supervise(id, "accept", accept_loop(shard.clone(), v, listener));
    }
    crate::runtime::supervise(id, "parking lot", crate::client::run_lot(shard.clone()));
    crate::health::start(&shard);
    // Hand buffered log records to the writer regularly, not only when a buffer fills.
    let flusher = shard.clone();
    crate::runtime::supervise(id, "log flusher", async move {
        loop {
            glommio::timer::sleep(crate::log::FLUSH_EVERY).await;
            flusher.log.flush_all();
        }
    });
    if let Some(l) = admin_listener {
        crate::runtime::supervise(id, "admin", admin::accept_loop(shard.clone(), l));
    }
    // Shutdown comes from the main thread's signal wait as a flag.
    while !stop.load(Ordering::SeqCst) {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    shard.begin_close();
    let deadline = Instant::now() + config.runtime.drain_timeout;
    while shard.nr_clients() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    if shard.nr_clients() > 0 {
        tracing::warn!(
            shard = id,
            open = shard.nr_clients(),
            "drain time over: closing remaining connections"
        );
    }
    shard.log.flush_all();
}

async fn accept_loop(shard: Rc<Shard>, vs: usize, listener: net::Listener) {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.closed().await;
            None
        })
        .await;
        let (stream, peer) = match accepted {
            None => return,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                // Out of file descriptors and the like: back off instead of spinning.
                shard.diag("accept failed", || {
                    tracing::warn!(shard = shard.id, "accept failed: {e}")
                });
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shard.accepted.set(shard.accepted.get() + 1);
        if let Some(acl) = &shard.config.services[vs].access {
            if !acl.permits(peer.ip()) {
                // Refused before TLS and before any byte is read: the socket just closes.
                shard.access_refused(vs, peer);
                continue;
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
                continue;
            }
        };
        let facts = ConnFacts {
            vs_idx: vs,
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
