//! edgeshard: a shard-per-core reverse proxy and layer-7 load balancer.
//!
//! The path of a request: `shard` starts pinned executors and their listeners (`net`); each
//! accepted connection runs `proxy::serve`, which parses (`http`), picks a real server
//! (`balance`), checks out an upstream connection (`upstream`), relays bodies (`relay`) and
//! turns failures into responses in one place (`proxy::refuse`, with `error`). Shards share
//! load through `shard::mesh`; `admin` serves /status from that view.

pub mod access;
pub mod admin;
pub mod balance;
pub mod client;
pub mod config;
pub mod control;
pub mod ctl;
pub mod demo;
pub mod diag;
pub mod error;
pub mod esp;
pub mod health;
pub mod http;
pub mod io;
pub mod limits;
pub mod log;
pub mod metrics;
pub mod net;
pub mod ocsp;
pub mod proxy;
pub mod proxyproto;
pub mod relay;
pub mod runtime;
pub mod shard;
pub mod sni;
pub mod tls;
pub mod upgrade;
pub mod upstream;
