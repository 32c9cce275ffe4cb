//! Running shards from the main thread: start-up (all-or-nothing), configuration generations
//! sent to every shard (reload), what an upgrade hands over (export), and each shard's main
//! loop (commands, then the drain at shutdown).

use super::*;

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
    replies: mpsc::Receiver<Reply>,
    pub sockets: sockets::Sockets,
    pub secrets: Arc<Secrets>,
    config: Arc<Config>,
    generation: u64,
    busy: crate::config::Busy,
}

/// A shard's answer to a configuration: what it still uses of what the configuration removed.
type Reply = Result<crate::config::Busy, String>;

/// Slots the current configuration does not have that this shard still uses.
fn still_used(state: &State) -> crate::config::Busy {
    let shard = state.current();
    let live: std::collections::HashSet<usize> =
        shard.config.services.iter().map(|v| v.slot).collect();
    crate::config::Busy {
        services: (0..state.vs_conns.len())
            .filter(|s| !live.contains(s) && state.vs_conns[*s].get() > 0)
            .collect(),
        servers: shard
            .config
            .servers
            .iter()
            .filter(|rs| rs.retired && state.load.local(rs.id) > 0)
            .map(|rs| rs.id.0)
            .collect(),
    }
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

    /// Slots of removed services and servers that a shard still used at the last reload.
    pub fn busy(&self) -> &crate::config::Busy {
        &self.busy
    }

    fn send_all(
        &mut self,
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
        let mut busy = crate::config::Busy::default();
        for _ in 0..self.cmds.len() {
            match self.replies.recv_timeout(Duration::from_secs(30)) {
                Ok(Ok(b)) => {
                    busy.services.extend(b.services);
                    busy.servers.extend(b.servers);
                }
                Ok(Err(e)) => errors.push(e),
                Err(_) => errors.push("a shard did not answer within 30s".into()),
            }
        }
        if errors.is_empty() {
            self.busy = busy;
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
    let (ready_tx, ready_rx) = mpsc::channel::<Reply>();
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
    let mut running = Running {
        handles,
        stop,
        cmds,
        replies: ready_rx,
        sockets,
        secrets,
        config: config.clone(),
        generation,
        busy: Default::default(),
    };
    if let Err(e) = running.send_all(&config, generation, plan) {
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
    replies: mpsc::Sender<Reply>,
) {
    if let Err(e) = net::start_engine(
        id,
        config.runtime.io_engine,
        config.runtime.shards[id].poll_before_park,
    ) {
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
            let _ = replies.send(
                r.map(|_| still_used(&state))
                    .map_err(|e| format!("shard {id}: {e}")),
            );
            if failed && !started {
                return;
            }
        }
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    state.begin_close();
    // every accept loop sees the close and returns before the drain counts: a connection
    // accepted after the count would be left with a task that never runs
    let stopping = Instant::now() + Duration::from_secs(1);
    while state.accepting.get() > 0 && Instant::now() < stopping {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
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
            super::accept::accept_loop(state.clone(), addr, l, stop),
        );
    }
    if let Some(fd) = admin {
        // SAFETY: the fd of a bound, listening socket whose ownership moves to glommio.
        let l = unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) };
        crate::runtime::supervise(state.id, "admin", admin::accept_loop(state.clone(), l));
        if let Some(a) = &shard.config.admin {
            *state.history.borrow_mut() = Some(admin::history::History::new(a.history_interval));
            crate::runtime::supervise(state.id, "history", admin::history::run(state.clone()));
        }
    }
    crate::health::start(shard);
    Ok(())
}
