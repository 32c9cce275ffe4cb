//! The `edgeshard` binary: `check` validates a config, `run` serves it until SIGTERM/SIGINT,
//! `ctl` and `token` talk to and set up the runtime API.

use clap::{Parser, Subcommand};
use edgeshard::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "edgeshard",
    version,
    about = "Shard-per-core reverse proxy and layer-7 load balancer",
    long_about = "Shard-per-core reverse proxy and layer-7 load balancer: virtual services \
terminate TLS, check host and directory (Edge Security Pack), choose a real server (round \
robin or least connection, cookie or source-IP persistence), re-encrypt to it and health-check \
every real server. One pinned executor per configured core.\n\n\
Signals to `run`: SIGHUP reloads the configuration, SIGUSR2 upgrades to the binary now at \
its path (no connection lost), SIGUSR1 reopens the log files, SIGTERM and SIGINT drain and \
exit.\n\n\
Files: /etc/edgeshard/edgeshard.toml (the packaged unit's configuration); \
/usr/share/doc/edgeshard/docs/ (the guides; configuration.md there is the key reference, \
also printed by `edgeshard config reference`)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file and exit (non-zero, naming file:line:field, if invalid).
    Check {
        /// The configuration file (TOML).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Serve a configuration until SIGTERM or SIGINT. SIGHUP reloads it, SIGUSR2 upgrades
    /// to the binary now at this path, SIGUSR1 reopens the log files.
    Run {
        /// The configuration file (TOML).
        #[arg(short, long)]
        config: PathBuf,
        /// Write the PID here once serving (else `[runtime] pid_file`); reloads' and
        /// upgrades' outcomes go to `<pid-file>.status`.
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
    /// Reload a running appliance's configuration (SIGHUP) and wait for the outcome. Exit 0:
    /// every shard serves the new configuration; 1: refused (the error says why, and the old
    /// configuration still serves); 2: no such process or no answer.
    Reload {
        /// The pid file the running process wrote (`run --pid-file` or `[runtime] pid_file`).
        #[arg(long)]
        pid_file: PathBuf,
        /// How long to wait for the outcome.
        #[arg(long, default_value = "60s")]
        timeout: String,
    },
    /// Upgrade a running appliance to the binary now at its path (SIGUSR2), with no
    /// connection refused, and wait for the outcome. Exit codes as for reload.
    Upgrade {
        /// The pid file the running process wrote (`run --pid-file` or `[runtime] pid_file`).
        #[arg(long)]
        pid_file: PathBuf,
        /// How long to wait for the new process to serve.
        #[arg(long, default_value = "60s")]
        timeout: String,
    },
    /// Start sample real servers on 127.0.0.1:9001 and :9002 and serve config/demo.toml
    /// (proxy on 127.0.0.1:8080, status on 127.0.0.1:9900).
    Demo {
        /// Another configuration to serve instead of the built-in demo (config/demo.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// As for `run` (to try `edgeshard reload` / `upgrade` on the demo).
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
    /// API tokens: `token new` prints a fresh one and the config lines holding its hash.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Talk to a running appliance's runtime API (the token from --token-file or
    /// EDGESHARD_TOKEN). Exit 0: done; 1: the appliance refused or failed; 2: usage or no answer.
    Ctl {
        /// The admin listener.
        #[arg(long, global = true, default_value = "http://127.0.0.1:9900")]
        admin: String,
        /// A file holding the API token (else EDGESHARD_TOKEN).
        #[arg(long, global = true)]
        token_file: Option<PathBuf>,
        /// PEM issuer of an https:// admin listener's certificate.
        #[arg(long, global = true)]
        ca: Option<PathBuf>,
        /// Print the API's JSON instead of a table or a line.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Configuration reference: `config reference` prints every key with its type, default
    /// and meaning (docs/configuration.md).
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Write the man pages (edgeshard.1 and one per command) into a directory (packaging).
    #[command(hide = true)]
    Manpages {
        /// The directory to write them to.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Every configuration key, as Markdown.
    Reference,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// A fresh random token, and the `[[admin.token]]` lines holding its SHA-256.
    New {
        /// The token's name in the audit log.
        #[arg(long, default_value = "ops")]
        name: String,
        /// read | operator | admin
        #[arg(long, default_value = "operator")]
        role: String,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Every real server: pool, state, health, weight, active connections, requests.
    Servers,
    /// No new clients; persisted clients and requests in flight go on. --wait answers once its
    /// last connection has ended (exit 1 if it has not by then).
    Drain {
        /// The virtual service by name (`service/sub` for a sub-service).
        service: String,
        /// The real server, IP:port as in the config.
        address: String,
        /// Wait up to this long (e.g. `10m`) for its last connection to end.
        #[arg(long)]
        wait: Option<String>,
    },
    /// Back in service.
    Ready {
        /// The virtual service by name (`service/sub` for a sub-service).
        service: String,
        /// The real server, IP:port as in the config.
        address: String,
    },
    /// Nothing new at all.
    Maint {
        /// The virtual service by name (`service/sub` for a sub-service).
        service: String,
        /// The real server, IP:port as in the config.
        address: String,
        /// Wait up to this long (e.g. `10m`) for its last connection to end.
        #[arg(long)]
        wait: Option<String>,
    },
    /// Set a weight (1..65535).
    Weight {
        /// The virtual service by name (`service/sub` for a sub-service).
        service: String,
        /// The real server, IP:port as in the config.
        address: String,
        /// The new weight.
        weight: u32,
    },
    /// Add a real server (IP:port) to a service or sub-service (`service/sub`), on every
    /// shard; with a health check it gets traffic once a check has passed.
    Add {
        /// The virtual service by name (`service/sub` for a sub-service).
        service: String,
        /// The real server, IP:port as in the config.
        address: String,
        /// Its weight (weighted methods).
        #[arg(long, default_value_t = 1000)]
        weight: u32,
        /// Active connections to it, appliance-wide (0: none).
        #[arg(long, default_value_t = 0)]
        connection_limit: u32,
    },
    /// Remove a real server: only once in maint with no connection left (`maint --wait`).
    Remove {
        /// The virtual service by name (`service/sub` for a sub-service).
        service: String,
        /// The real server, IP:port as in the config.
        address: String,
    },
    /// Reload the configuration file (as SIGHUP), answering with the result.
    Reload,
    /// Exit 0 when /healthz says the appliance is healthy, 1 when not, 2 when it cannot tell
    /// (no answer, or the token is missing or wrong).
    Health {
        /// Only the appliance itself (its shards), not its real servers: the check for a
        /// keepalived pair that shares its real servers.
        #[arg(long)]
        appliance: bool,
    },
}

/// A path segment as the API reads it: `/` kept (a sub-service), everything but unreserved
/// characters and the address's `:`, `[`, `]` percent-encoded.
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'a'..=b'z'
            | b'A'..=b'Z'
            | b'0'..=b'9'
            | b'-'
            | b'.'
            | b'_'
            | b'~'
            | b':'
            | b'['
            | b']'
            | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn ctl(
    admin: &str,
    token_file: Option<PathBuf>,
    ca: Option<PathBuf>,
    json: bool,
    cmd: CtlCommand,
) -> ExitCode {
    use edgeshard::ctl::{servers_table, Target, EXIT_REFUSED, EXIT_USAGE};
    use serde_json::json;
    let target = match Target::new(admin, token_file.as_deref(), ca.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let state = |service: &str, address: &str, state: &str, wait: &Option<String>| {
        let mut body = json!({ "state": state });
        if let Some(w) = wait {
            body["wait"] = json!(w);
        }
        (
            "POST",
            format!(
                "/api/v1/services/{}/real_servers/{}/state",
                encode(service),
                encode(address)
            ),
            Some(body),
        )
    };
    let (method, path, body) = match &cmd {
        CtlCommand::Servers => ("GET", "/api/v1/services".to_string(), None),
        CtlCommand::Add {
            service,
            address,
            weight,
            connection_limit,
        } => (
            "POST",
            format!("/api/v1/services/{}/real_servers", encode(service)),
            Some(
                json!({ "address": address, "weight": weight, "connection_limit": connection_limit }),
            ),
        ),
        CtlCommand::Remove { service, address } => (
            "DELETE",
            format!(
                "/api/v1/services/{}/real_servers/{}",
                encode(service),
                encode(address)
            ),
            None,
        ),
        CtlCommand::Reload => ("POST", "/api/v1/reload".to_string(), Some(json!({}))),
        CtlCommand::Health { appliance } => (
            "GET",
            if *appliance {
                "/healthz?scope=appliance".to_string()
            } else {
                "/healthz".to_string()
            },
            None,
        ),
        CtlCommand::Drain {
            service,
            address,
            wait,
        } => state(service, address, "drain", wait),
        CtlCommand::Maint {
            service,
            address,
            wait,
        } => state(service, address, "maint", wait),
        CtlCommand::Ready { service, address } => state(service, address, "ready", &None),
        CtlCommand::Weight {
            service,
            address,
            weight,
        } => (
            "PUT",
            format!(
                "/api/v1/services/{}/real_servers/{}/weight",
                encode(service),
                encode(address)
            ),
            Some(json!({ "weight": weight })),
        ),
    };
    let wait = match &cmd {
        CtlCommand::Drain { wait: Some(w), .. } | CtlCommand::Maint { wait: Some(w), .. } => {
            match edgeshard::config::parse_duration(w) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("error: --wait: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            }
        }
        _ => Duration::ZERO,
    };
    let (status, v) =
        match target.call(method, &path, body.as_ref(), wait + Duration::from_secs(10)) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        };
    if matches!(cmd, CtlCommand::Health { .. }) && (status == 401 || status == 403) {
        eprintln!("error: HTTP {status}: cannot tell the appliance's health: {v}");
        return ExitCode::from(EXIT_USAGE);
    }
    let ok = (200..300).contains(&status);
    if json || !ok {
        let text = serde_json::to_string_pretty(&v).unwrap_or_default();
        if ok {
            println!("{text}");
        } else {
            eprintln!("error: HTTP {status}: {text}");
        }
    } else {
        match cmd {
            CtlCommand::Servers => print!("{}", servers_table(&v)),
            CtlCommand::Health { .. } => println!("healthy"),
            CtlCommand::Reload => {
                println!("reloaded: configuration generation {}", v["generation"])
            }
            CtlCommand::Remove { .. } => println!(
                "{} {}: removed (configuration generation {})",
                v["pool"].as_str().unwrap_or("?"),
                v["address"].as_str().unwrap_or("?"),
                v["generation"]
            ),
            CtlCommand::Add { .. } => println!(
                "{} {}: added, health {}, weight {} (configuration generation {})",
                v["pool"].as_str().unwrap_or("?"),
                v["address"].as_str().unwrap_or("?"),
                v["health"].as_str().unwrap_or("?"),
                v["weight"],
                v["generation"]
            ),
            _ => println!(
                "{} {}: state {}, weight {}, {} active connections",
                v["pool"].as_str().unwrap_or("?"),
                v["address"].as_str().unwrap_or("?"),
                v["state"].as_str().unwrap_or("?"),
                v["weight"],
                v["active_connections"]
            ),
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_REFUSED)
    }
}

/// edgeshard.1 and edgeshard-<command>.1 for every visible command, from the clap definitions.
fn manpages(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let top = Cli::command();
    let write = |cmd: clap::Command, file: String| -> std::io::Result<()> {
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut out)?;
        std::fs::write(dir.join(file), out)
    };
    // every visible command at every depth: the SEE ALSO lists of their parents name them
    fn walk(
        cmd: &clap::Command,
        words: &[&str],
        write: &dyn Fn(clap::Command, String) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
            if sub.get_name() == "help" {
                continue;
            }
            let mut w = words.to_vec();
            w.push(sub.get_name());
            let name = w.join("-");
            let page = sub
                .clone()
                .display_name(name.clone())
                .bin_name(w.join(" "))
                .version(env!("CARGO_PKG_VERSION"))
                .disable_help_subcommand(true);
            write(page, format!("{name}.1"))?;
            walk(sub, &w, write)?;
        }
        Ok(())
    }
    walk(&top, &["edgeshard"], &write)?;
    write(top.disable_help_subcommand(true), "edgeshard.1".into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The clients write straight to their terminal; no shard runs there.
    match cli.command {
        Command::Token {
            command: TokenCommand::New { name, role },
        } => {
            if !["read", "operator", "admin"].contains(&role.as_str()) {
                eprintln!("error: --role must be read, operator or admin");
                return ExitCode::from(2);
            }
            return match edgeshard::ctl::token_new(&name, &role) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Command::Ctl {
            admin,
            token_file,
            ca,
            json,
            command,
        } => return ctl(&admin, token_file, ca, json, command),
        Command::Reload { pid_file, timeout } => {
            return signal_and_wait(&pid_file, libc::SIGHUP, "reload", &timeout)
        }
        Command::Upgrade { pid_file, timeout } => {
            return signal_and_wait(&pid_file, libc::SIGUSR2, "upgrade", &timeout)
        }
        Command::Config {
            command: ConfigCommand::Reference,
        } => {
            print!("{}", edgeshard::config::reference::markdown());
            return ExitCode::SUCCESS;
        }
        Command::Manpages { out } => {
            return match manpages(&out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {}: {e}", out.display());
                    ExitCode::from(1)
                }
            };
        }
        _ => {}
    }
    // SIGHUP/SIGUSR2/SIGTERM… are taken synchronously by the main thread: blocked before any
    // other thread exists (they inherit the mask), and before the config is read, so that
    // a signal at start-up is handled once serving instead of killing the process.
    let signals = match cli.command {
        Command::Run { .. } | Command::Demo { .. } => Some(edgeshard::runtime::block_signals()),
        _ => None,
    };
    // (tests: a start-up slow enough to signal it deterministically before it serves)
    if signals.is_some()
        && std::env::var_os("EDGESHARD_FAILPOINT").is_some_and(|v| v == "slow start")
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    // Diagnostics go through a writer thread: a stalled stderr never blocks a shard.
    edgeshard::diag::init();
    let code = match cli.command {
        // answered above, before diagnostics start
        Command::Token { .. }
        | Command::Ctl { .. }
        | Command::Reload { .. }
        | Command::Upgrade { .. }
        | Command::Config { .. }
        | Command::Manpages { .. } => ExitCode::SUCCESS,
        Command::Check { config } => {
            match Config::load(&config) {
                Ok(c) => {
                    for w in c.warnings() {
                        println!("warning: {w}");
                    }
                    if let Some(f) = c.admin.as_ref().and_then(|a| a.state_file.as_ref()) {
                        if let Err(e) = edgeshard::admin::load_state_file(f, &c) {
                            println!("warning: admin.state_file: {e}: run will start from the config alone");
                        }
                        let dir = f.parent().filter(|d| !d.as_os_str().is_empty());
                        if dir.is_some_and(|d| !d.is_dir()) {
                            println!(
                            "warning: admin.state_file: {} does not exist: runtime changes would not be kept",
                            dir.map(|d| d.display().to_string()).unwrap_or_default()
                        );
                        }
                    }
                    let n = |k: usize, one: &str, many: &str| {
                        format!("{k} {}", if k == 1 { one } else { many })
                    };
                    println!(
                        "{}: ok ({}, {}, {})",
                        config.display(),
                        n(c.services.len(), "virtual service", "virtual services"),
                        n(c.nr_servers, "real server", "real servers"),
                        n(c.runtime.cores.len(), "shard", "shards")
                    );
                    // appliances that share clients must print the same
                    println!("fingerprint: {}", c.fingerprint());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    edgeshard::diag::line(format!("error: {e}\n"));
                    ExitCode::from(2)
                }
            }
        }
        Command::Run { config, pid_file } => run(
            Config::load(&config),
            Some(config),
            pid_file,
            signals.expect("blocked above"),
        ),
        Command::Demo { config, pid_file } => {
            let servers = [
                "127.0.0.1:9001".parse().unwrap(),
                "127.0.0.1:9002".parse().unwrap(),
            ];
            if let Err(e) = edgeshard::demo::start_real_servers(&servers) {
                edgeshard::diag::line(format!(
                    "error: cannot start the sample real servers on 127.0.0.1:9001/9002: {e}\n"
                ));
                return ExitCode::from(1);
            }
            edgeshard::diag::line(
                "sample real servers on 127.0.0.1:9001 and 127.0.0.1:9002\n".into(),
            );
            edgeshard::diag::line(
                "try:  curl -i http://127.0.0.1:8080/   and   curl http://127.0.0.1:9900/status\n"
                    .into(),
            );
            // the demo's config is in the binary: `edgeshard demo` works from any directory
            match config {
                Some(path) => run(
                    Config::load(&path),
                    Some(path),
                    pid_file,
                    signals.expect("blocked above"),
                ),
                None => run(
                    Config::parse(
                        std::path::Path::new("config/demo.toml (built in)"),
                        include_str!("../config/demo.toml"),
                    ),
                    None,
                    pid_file,
                    signals.expect("blocked above"),
                ),
            }
        }
    };
    edgeshard::diag::flush(Duration::from_secs(2));
    if signals.is_some() {
        // a serving process ends without the exit handlers (see runtime::exit_now)
        let n = [0u8, 1, 2, 70]
            .into_iter()
            .find(|&n| code == ExitCode::from(n))
            .unwrap_or(1);
        edgeshard::runtime::exit_now(n as i32);
    }
    code
}

/// `edgeshard reload|upgrade`: signal the process named by the pid file and wait until the
/// outcome file beside it reports this operation.
fn signal_and_wait(pid_file: &std::path::Path, sig: i32, op: &str, timeout: &str) -> ExitCode {
    use edgeshard::control::read_outcome;
    let timeout = match edgeshard::config::parse_duration(timeout) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: --timeout: {e}");
            return ExitCode::from(2);
        }
    };
    let pid: i32 = match std::fs::read_to_string(pid_file)
        .map_err(|e| e.to_string())
        .and_then(|t| {
            t.trim()
                .parse()
                .map_err(|_| format!("not a PID: {:?}", t.trim()))
        }) {
        Ok(p) if p > 0 => p,
        Ok(p) => {
            eprintln!("error: {}: not a PID: {p}", pid_file.display());
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("error: {}: {e}", pid_file.display());
            return ExitCode::from(2);
        }
    };
    if !edgeshard::control::is_edgeshard(pid) {
        eprintln!(
            "error: process {pid} (from {}) is not edgeshard: a stale pid file? nothing was signalled",
            pid_file.display()
        );
        return ExitCode::from(2);
    }
    if read_outcome(pid_file, "start").is_none() && read_outcome(pid_file, "upgrade").is_none() {
        eprintln!(
            "error: {} is missing: was process {pid} started with this pid file? nothing was signalled",
            edgeshard::control::outcome_path(pid_file).display()
        );
        return ExitCode::from(2);
    }
    let before = read_outcome(pid_file, op).map_or(0, |o| o.seq);
    // SAFETY: kill with a PID and a signal number.
    if unsafe { libc::kill(pid, sig) } != 0 {
        eprintln!(
            "error: cannot signal process {pid} (from {}): {}",
            pid_file.display(),
            std::io::Error::last_os_error()
        );
        return ExitCode::from(2);
    }
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Some(o) = read_outcome(pid_file, op).filter(|o| o.seq > before) {
            return if o.ok {
                match op {
                    "upgrade" => println!(
                        "upgraded: process {pid} handed over to {} (configuration generation {})",
                        o.pid, o.generation
                    ),
                    _ => println!("reloaded: configuration generation {}", o.generation),
                }
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "error: {op} failed (process {} still serves generation {}): {}",
                    o.pid,
                    o.generation,
                    o.error.unwrap_or_default()
                );
                ExitCode::from(1)
            };
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    eprintln!(
        "error: no outcome of the {op} within {timeout:?} (see the appliance's log; is {} the pid file it was started with?)",
        pid_file.display()
    );
    ExitCode::from(2)
}

fn run(
    loaded: Result<Config, edgeshard::config::ConfigError>,
    config_path: Option<PathBuf>,
    pid_file: Option<PathBuf>,
    signals: libc::sigset_t,
) -> ExitCode {
    use edgeshard::control;
    // Started by an upgrade: the old process waits on this socket for "ready".
    let successor = control::successor_socket();
    let fail = |code: u8, e: String| {
        edgeshard::diag::line(format!("error: {e}\n"));
        if let Some(s) = &successor {
            control::report(s, Err(&e));
        }
        edgeshard::diag::flush(Duration::from_secs(2));
        ExitCode::from(code)
    };
    let mut config = match loaded {
        Ok(c) => c,
        Err(e) => return fail(2, e.to_string()),
    };
    // What the process this one replaces hands over: its sockets, keys and state.
    let handover = match &successor {
        None => None,
        Some(sock) => match edgeshard::upgrade::receive(sock) {
            Ok(x) => Some(x),
            Err(e) => return fail(1, format!("upgrade hand-over: {e}")),
        },
    };
    // Real servers the runtime API added or removed: handed over, or kept in the state file.
    let state_file = config.admin.as_ref().and_then(|a| a.state_file.clone());
    let runtime = match (&handover, &state_file) {
        (Some((doc, _)), _) => Some(doc.runtime.clone()),
        (None, Some(f)) => edgeshard::admin::load_runtime_servers(f)
            .map_err(|e| tracing::warn!("[admin] state_file: {e}; no runtime real servers"))
            .ok(),
        (None, None) => None,
    };
    if let Some(r) = runtime {
        for note in config.apply_runtime(&r) {
            tracing::warn!("runtime real servers: {note}");
        }
        control::set_runtime_servers(r);
    }
    let config = Arc::new(config);
    if let Err(e) = edgeshard::runtime::check_memlock(&config) {
        return fail(1, e);
    }
    let nofile = edgeshard::runtime::raise_nofile();
    if nofile < 4096 {
        tracing::warn!(
            limit = nofile,
            "open-files limit is low: raise LimitNOFILE / ulimit -n for many connections"
        );
    }
    // Runtime changes (operator state, weights) kept from before: every shard starts with them.
    let mut changes = match &state_file {
        None => Vec::new(),
        // the file only keeps what the API changed: unreadable, it is a warning, not a stop
        Some(f) => edgeshard::admin::load_state_file(f, &config).unwrap_or_else(|e| {
            tracing::warn!("[admin] state_file: {e}; starting from the config alone");
            Vec::new()
        }),
    };
    let mut seeds = Vec::new();
    let (sockets, secrets, carried) = match handover {
        None => (Default::default(), None, None),
        Some((doc, fds)) => {
            let secrets = match doc.to_secrets() {
                Ok(s) => s,
                Err(e) => return fail(1, e),
            };
            changes.extend(edgeshard::upgrade::changes(&doc.servers, &config));
            seeds = edgeshard::upgrade::seeds(&doc.source, &config);
            let list = doc
                .sockets
                .iter()
                .zip(fds)
                .map(|(&(a, s), fd)| (a, s, fd))
                .collect();
            (
                edgeshard::shard::sockets::Sockets::inherited(list),
                Some(secrets),
                Some(doc.control),
            )
        }
    };
    let log = edgeshard::log::LogWriter::start(&config.log);
    // an upgrade loads the file again: one more generation than the old process's
    let generation = carried.as_ref().map_or(1, |c| c.generation + 1);
    // OCSP statuses are fetched by a thread of their own, once this process serves
    edgeshard::ocsp::start();
    let mut running = match edgeshard::shard::start(
        config.clone(),
        log.clone(),
        changes,
        seeds,
        sockets,
        secrets,
        generation,
    ) {
        Ok(r) => r,
        Err(e) => {
            fail(1, e);
            // Shards that did start hold no state worth saving: exit without waiting.
            edgeshard::runtime::exit_now(1);
        }
    };
    let cli_pid_file = pid_file.clone();
    let pid_file = pid_file.or_else(|| config.runtime.pid_file.clone());
    let mut control = control::Control::new(
        config_path.clone().unwrap_or_default(),
        pid_file,
        cli_pid_file,
        log.clone(),
        carried.as_ref(),
    );
    tracing::info!(
        shards = config.runtime.cores.len(),
        cores = ?config.runtime.cores,
        services = config.services.len(),
        pid = std::process::id(),
        generation = running.generation(),
        "edgeshard ready"
    );
    for vs in &config.services {
        tracing::info!(service = %vs.name, listen = %vs.listen, real_servers = config.pools[vs.pool].servers.len(), sub_services = vs.sub_services.len(), "serving");
    }
    for vs in &config.services {
        if vs
            .reencrypt
            .as_ref()
            .is_some_and(|r| r.insecure_skip_verify)
        {
            tracing::warn!(
                service = %vs.name,
                "reencrypt.insecure_skip_verify = true: real servers' certificates are NOT verified"
            );
        }
    }
    if let Some(a) = &config.admin {
        tracing::info!(listen = %a.listen, tokens = a.tokens.len(), "admin endpoint: status page, /status, /metrics, /healthz, /api/v1");
    }
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    match &successor {
        None => control.serving("start", running.generation()),
        Some(sock) => {
            control.serving("upgrade", running.generation());
            log.lifecycle(
                "upgrade",
                running.generation(),
                "ok",
                "serving: took over the listening sockets",
            );
            control::report(sock, Ok(()));
        }
    }
    let why = loop {
        match edgeshard::runtime::wait_signal(&signals) {
            edgeshard::runtime::Signal::Stop(sig) => break sig,
            edgeshard::runtime::Signal::ReopenLogs => log.reopen(),
            edgeshard::runtime::Signal::Reload if config_path.is_none() => control.refuse(
                "reload",
                "the built-in demo configuration has no file to read again: run edgeshard demo --config FILE",
            ),
            edgeshard::runtime::Signal::Reload => control.reload(&mut running),
            edgeshard::runtime::Signal::Upgrade if config_path.is_none() => control.refuse(
                "upgrade",
                "the built-in demo configuration has no file for a new process: run edgeshard demo --config FILE",
            ),
            edgeshard::runtime::Signal::Upgrade => {
                if let Ok(new_pid) = control.upgrade(&running) {
                    // a reload asked for during the hand-over goes to the process that now
                    // serves (this one drains and exits)
                    if control::pending(libc::SIGHUP) {
                        // SAFETY: kill with a PID and a signal number.
                        unsafe { libc::kill(new_pid as i32, libc::SIGHUP) };
                    }
                    break "upgrade";
                }
            }
        }
    };
    let drain = running.config().runtime.drain_timeout;
    tracing::info!(reason = why, drain = ?drain, "shutting down: no new connections, draining");
    running.stop();
    running.join();
    // the drain's last records reach their files before the process ends
    log.finish(Duration::from_secs(2));
    control.exiting();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every command and every option says what it is for (--help, the man pages).
    #[test]
    fn every_command_and_option_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                let p = format!("{path} {}", sub.get_name());
                if sub.get_name() != "help" && sub.get_about().is_none() {
                    missing.push(p.clone());
                }
                walk(sub, &p, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "edgeshard", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
        Cli::command().debug_assert();
    }

    /// The committed man pages are what the binary generates.
    #[test]
    fn the_committed_man_pages_are_current() {
        let dir = std::env::temp_dir().join(format!("edgeshard-man-{}", std::process::id()));
        super::manpages(&dir).unwrap();
        let committed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/man");
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in &names {
            let want = std::fs::read(dir.join(n)).unwrap();
            let have = std::fs::read(committed.join(n)).unwrap_or_default();
            assert!(
                want == have,
                "docs/man/{} differs: run cargo run -- manpages --out docs/man",
                n.to_string_lossy()
            );
        }
        let mut have: Vec<_> = std::fs::read_dir(&committed)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        have.sort();
        assert_eq!(have, names, "docs/man holds exactly the generated pages");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
