//! Validation of `[runtime]` and `[[runtime.shard]]`: cores and shards, the per-shard
//! executor settings, the keys; and the CPUs this process may use.

use super::*;

impl Validator<'_> {
    /// An io_uring depth, if given: a power of two between 8 and 4096.
    fn ring_depth(
        &self,
        v: &Option<Spanned<usize>>,
        field: &str,
    ) -> Result<Option<usize>, ConfigError> {
        match v {
            None => Ok(None),
            Some(d) if d.get_ref().is_power_of_two() && (8..=4096).contains(d.get_ref()) => {
                Ok(Some(*d.get_ref()))
            }
            Some(d) => Err(self.err(
                Some(d.span()),
                field,
                "must be a power of two between 8 and 4096".into(),
            )),
        }
    }

    /// A spin-before-park time, if given (`Some(None)`: given as zero, i.e. never spin).
    fn spin(
        &self,
        v: &Option<Spanned<String>>,
        field: &str,
    ) -> Result<Option<Option<Duration>>, ConfigError> {
        match v {
            None => Ok(None),
            Some(s) => match parse_duration(s.get_ref()) {
                Ok(d) => Ok(Some((!d.is_zero()).then_some(d))),
                Err(m) => Err(self.err(Some(s.span()), field, m)),
            },
        }
    }

    /// A poll-before-park time, if given: at most 10 ms (the shard's timers and cross-shard
    /// messages wait that long at worst).
    fn poll_before_park(
        &self,
        v: &Option<Spanned<String>>,
        field: &str,
    ) -> Result<Option<Duration>, ConfigError> {
        match v {
            None => Ok(None),
            Some(s) => match parse_duration(s.get_ref()) {
                Ok(d) if d <= Duration::from_millis(10) => Ok(Some(d)),
                Ok(_) => Err(self.err(Some(s.span()), field, "at most 10ms".into())),
                Err(m) => Err(self.err(Some(s.span()), field, m)),
            },
        }
    }

    /// Each shard's settings: the runtime defaults, then the `[[runtime.shard]]` for its core.
    pub(super) fn shards(
        &self,
        rt: &FileRuntime,
        runtime: &Runtime,
        services: &[VirtualService],
    ) -> Result<Vec<ShardSettings>, ConfigError> {
        let all: Vec<usize> = (0..services.len()).collect();
        let mut shards: Vec<ShardSettings> = runtime
            .cores
            .iter()
            .map(|&core| ShardSettings {
                core,
                ring_depth: runtime.ring_depth,
                io_memory: runtime.io_memory,
                spin_before_park: runtime.spin_before_park,
                poll_before_park: runtime.poll_before_park,
                backlog: runtime.backlog,
                max_connections: 0,
                services: all.clone(),
            })
            .collect();
        let mut seen = HashSet::new();
        for (i, o) in rt.shard.iter().enumerate() {
            let p = format!("runtime.shard[{i}]");
            let core = *o.core.get_ref();
            if !runtime.cores.contains(&core) {
                return Err(self.err(
                    Some(o.core.span()),
                    &format!("{p}.core"),
                    format!(
                        "no shard runs on CPU {core} (runtime cores: {:?})",
                        runtime.cores
                    ),
                ));
            }
            if !seen.insert(core) {
                return Err(self.err(
                    Some(o.core.span()),
                    &format!("{p}.core"),
                    format!("CPU {core} has two [[runtime.shard]] entries"),
                ));
            }
            let ring_depth = self.ring_depth(&o.ring_depth, &format!("{p}.ring_depth"))?;
            let io_memory = match &o.io_memory {
                None => None,
                Some(_) => Some(self.size(&o.io_memory, &format!("{p}.io_memory"), 0)?),
            };
            let spin = self.spin(&o.spin_before_park, &format!("{p}.spin_before_park"))?;
            let poll =
                self.poll_before_park(&o.poll_before_park, &format!("{p}.poll_before_park"))?;
            let only = match &o.services {
                None => None,
                Some(names) => {
                    let mut idx = Vec::new();
                    for n in names.get_ref() {
                        match services.iter().position(|v| &v.name == n) {
                            Some(i) => idx.push(i),
                            None => {
                                return Err(self.err(
                                    Some(names.span()),
                                    &format!("{p}.services"),
                                    format!("no virtual service named {n:?}"),
                                ))
                            }
                        }
                    }
                    Some(idx)
                }
            };
            for s in shards.iter_mut().filter(|s| s.core == core) {
                if let Some(d) = ring_depth {
                    s.ring_depth = d;
                }
                if let Some(m) = io_memory {
                    s.io_memory = m;
                }
                if let Some(sp) = spin {
                    s.spin_before_park = sp;
                }
                if let Some(pp) = poll {
                    s.poll_before_park = pp;
                }
                if let Some(b) = o.backlog {
                    s.backlog = b;
                }
                s.max_connections = o.max_connections.unwrap_or(0);
                if let Some(only) = &only {
                    s.services = only.clone();
                }
            }
        }
        for (i, vs) in services.iter().enumerate() {
            if !shards.iter().any(|s| s.services.contains(&i)) {
                return Err(self.err(
                    None,
                    "runtime.shard",
                    format!("no shard serves virtual service {:?}", vs.name),
                ));
            }
        }
        Ok(shards)
    }

    pub(super) fn runtime(&self, rt: &FileRuntime) -> Result<Runtime, ConfigError> {
        let online = online_cpus();
        let cores: Vec<usize> = match (&rt.cores, &rt.shards) {
            (Some(c), Some(s)) if c.get_ref().len() != *s.get_ref() => {
                return Err(self.err(
                    Some(s.span()),
                    "runtime.shards",
                    format!(
                        "{} shards but {} cores listed: give one or the other",
                        s.get_ref(),
                        c.get_ref().len()
                    ),
                ))
            }
            (Some(c), _) => {
                if c.get_ref().is_empty() {
                    return Err(self.err(Some(c.span()), "runtime.cores", "is empty".into()));
                }
                for &cpu in c.get_ref() {
                    if !online.contains(&cpu) {
                        return Err(self.err(
                            Some(c.span()),
                            "runtime.cores",
                            format!("CPU {cpu} does not exist or is offline (online: {online:?})"),
                        ));
                    }
                }
                let distinct: HashSet<_> = c.get_ref().iter().collect();
                if distinct.len() != c.get_ref().len() && !rt.oversubscribe {
                    return Err(self.err(
                        Some(c.span()),
                        "runtime.cores",
                        "a CPU is listed twice: set runtime.oversubscribe = true to run several shards on one CPU".into(),
                    ));
                }
                c.get_ref().clone()
            }
            (None, Some(s)) => {
                let n = *s.get_ref();
                if n == 0 {
                    return Err(self.err(
                        Some(s.span()),
                        "runtime.shards",
                        "must be at least 1".into(),
                    ));
                }
                if n > online.len() && !rt.oversubscribe {
                    return Err(self.err(
                        Some(s.span()),
                        "runtime.shards",
                        format!(
                            "{n} shards but only {} CPUs online: set runtime.oversubscribe = true to allow it",
                            online.len()
                        ),
                    ));
                }
                (0..n).map(|i| online[i % online.len()]).collect()
            }
            (None, None) => online.clone(),
        };
        let io_memory = self.size(&rt.io_memory, "runtime.io_memory", 1 << 20)?;
        let ring_depth = self
            .ring_depth(&rt.ring_depth, "runtime.ring_depth")?
            .unwrap_or(256);
        let spin_before_park = self
            .spin(&rt.spin_before_park, "runtime.spin_before_park")?
            .flatten();
        let poll_before_park = self
            .poll_before_park(&rt.poll_before_park, "runtime.poll_before_park")?
            .unwrap_or(Duration::from_micros(200));
        let buffers = match &rt.io_uring_buffers {
            None => 256,
            Some(b) => {
                let n = *b.get_ref();
                if !(16..=32768).contains(&n) || !n.is_power_of_two() {
                    return Err(self.err(
                        Some(b.span()),
                        "runtime.io_uring_buffers",
                        format!("{n}: a power of two from 16 to 32768"),
                    ));
                }
                n as u16
            }
        };
        let io_engine = match &rt.io_engine {
            None => crate::net::Engine::Epoll,
            Some(e) => match e.get_ref().as_str() {
                "epoll" => crate::net::Engine::Epoll,
                "io_uring" => crate::net::Engine::IoUring { buffers },
                other => {
                    return Err(self.err(
                        Some(e.span()),
                        "runtime.io_engine",
                        format!("{other:?}: expected \"epoll\" or \"io_uring\""),
                    ))
                }
            },
        };
        Ok(Runtime {
            cores,
            drain_timeout: self.duration(
                &rt.drain_timeout,
                "runtime.drain_timeout",
                Duration::from_secs(30),
            )?,
            ring_depth,
            io_memory,
            spin_before_park,
            poll_before_park,
            io_engine,
            shards: Vec::new(),
            backlog: rt.backlog.as_ref().map(|b| *b.get_ref()).unwrap_or(1024),
            max_connections: rt.max_connections.unwrap_or(0),
            pid_file: rt.pid_file.as_ref().map(|p| self.path(p.get_ref())),
            ticket_keys: match &rt.ticket_key_file {
                None => None,
                Some(f) => {
                    let field = "runtime.ticket_key_file";
                    let text = self.secret_file(f, field)?;
                    let path = self.path(f.get_ref());
                    let err = |m: String| self.err(Some(f.span()), field, m);
                    Some(
                        crate::tls::read_ticket_keys(&text)
                            .map_err(|m| err(format!("{}: {m}", path.display())))?,
                    )
                }
            },
            persistence_key: match &rt.persistence_key {
                None => None,
                Some(k) => Some(parse_key(k.get_ref()).ok_or_else(|| {
                    self.err(
                        Some(k.span()),
                        "runtime.persistence_key",
                        "must be 64 hex digits (32 bytes)".into(),
                    )
                })?),
            },
        })
    }
}

/// CPUs this process may run on.
pub fn online_cpus() -> Vec<usize> {
    // sched_getaffinity honours cgroups/taskset, unlike a count of /proc/cpuinfo.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        return (0..n).collect();
    }
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}
