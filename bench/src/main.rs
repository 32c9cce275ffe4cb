//! edgeshard-bench: the load generator and the bench origin. Its HTTP code is its own, so a
//! parser bug in the proxy cannot hide behind the same bug here.
//!
//!   edgeshard-bench load   --url http://127.0.0.1:8080/ --connections 32 --duration 10s
//!   edgeshard-bench load   --url https://127.0.0.1:8443/ --rate 20000 --new-connection ...
//!   edgeshard-bench origin --listen 127.0.0.1:9101 [--tls-cert c.pem --tls-key k.pem]

mod load;
mod origin;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "edgeshard-bench",
    about = "Load generator and bench origin for edgeshard"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate load and report throughput, latency percentiles and errors.
    Load(load::Args),
    /// Serve fixed responses (keep-alive, optional TLS) as a real server.
    Origin(origin::Args),
}

fn main() {
    match Cli::parse().cmd {
        Cmd::Load(a) => load::run(a),
        Cmd::Origin(a) => origin::run(a),
    }
}
