//! The `edgeshard` binary: `check` validates a config, `run` serves it until SIGTERM/SIGINT.

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
    about = "Shard-per-core reverse proxy and layer-7 load balancer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file and exit (non-zero, naming file:line:field, if invalid).
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Serve a configuration until SIGTERM or SIGINT.
    Run {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Start sample real servers on 127.0.0.1:9001 and :9002 and serve config/demo.toml
    /// (proxy on 127.0.0.1:8080, status on 127.0.0.1:9900).
    Demo {
        #[arg(short, long, default_value = "config/demo.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Diagnostics go through a writer thread: a stalled stderr never blocks a shard.
    edgeshard::diag::init();
    let code = match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} virtual services, {} real servers, {} shards)",
                    config.display(),
                    c.services.len(),
                    c.nr_servers,
                    c.runtime.cores.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                edgeshard::diag::line(format!("error: {e}\n"));
                ExitCode::from(2)
            }
        },
        Command::Run { config } => run(config),
        Command::Demo { config } => {
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
            run(config)
        }
    };
    edgeshard::diag::flush(Duration::from_secs(2));
    code
}

fn run(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            edgeshard::diag::line(format!("error: {e}\n"));
            return ExitCode::from(2);
        }
    };
    if let Err(e) = edgeshard::runtime::check_memlock(&config) {
        edgeshard::diag::line(format!("error: {e}\n"));
        return ExitCode::from(1);
    }
    let nofile = edgeshard::runtime::raise_nofile();
    if nofile < 4096 {
        tracing::warn!(
            limit = nofile,
            "open-files limit is low: raise LimitNOFILE / ulimit -n for many connections"
        );
    }
    // Block the shutdown signals before any shard thread exists, so they inherit the mask
    // and only this thread receives them, synchronously.
    let signals = edgeshard::runtime::block_signals();
    let log = edgeshard::log::LogWriter::start(&config.log);
    let running = match edgeshard::shard::start(config.clone(), log.clone()) {
        Ok(r) => r,
        Err(e) => {
            edgeshard::diag::line(format!("error: {e}\n"));
            // Shards that did start hold no state worth saving: exit without waiting for them.
            edgeshard::diag::flush(Duration::from_secs(2));
            std::process::exit(1);
        }
    };
    tracing::info!(
        shards = config.runtime.cores.len(),
        cores = ?config.runtime.cores,
        services = config.services.len(),
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
        tracing::info!(listen = %a.listen, "admin endpoint: GET /status");
    }
    let sig = edgeshard::runtime::wait_for_shutdown(&signals, || log.reopen());
    tracing::info!(signal = sig, drain = ?config.runtime.drain_timeout, "shutting down: no new connections, draining");
    running.stop();
    running.join();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
