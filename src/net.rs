//! Listening sockets: one per shard and virtual service, bound with SO_REUSEPORT so the
//! kernel spreads connections over shards. No HTTP here.

use glommio::net::TcpListener;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::os::unix::io::{FromRawFd, IntoRawFd};

/// Bind `addr` with SO_REUSEPORT and the given backlog, for the current shard's executor.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let sk = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    sk.set_reuse_address(true)?;
    sk.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // [::] serves IPv6 only; an IPv4 service is configured on its own.
        sk.set_only_v6(true)?;
    }
    sk.set_nonblocking(true)?;
    sk.bind(&SockAddr::from(addr))?;
    sk.listen(backlog.min(i32::MAX as u32) as i32)?;
    // SAFETY: the fd is a freshly bound, listening TCP socket whose ownership moves here.
    Ok(unsafe { TcpListener::from_raw_fd(sk.into_raw_fd()) })
}
