//! edgeshard: a shard-per-core reverse proxy and layer-7 load balancer.
//!
//! The path of a request: `shard` starts pinned executors and their listeners (`net`), each
//! accepted connection runs `proxy::serve`, which parses (`http`), picks a real server
//! (`balance`), checks out an upstream connection (`upstream`), relays bodies (`relay`) and
//! answers errors in one place (`error`). `admin` serves /status from the mesh view.

pub mod config;
pub mod balance;
pub mod http;
