//! Listening sockets: one per shard and virtual service, bound with SO_REUSEPORT so the
//! kernel spreads connections over shards. No HTTP here.

use glommio::net::TcpListener;
use socket2::{Domain, Protocol, SockAddr, Socket as RawSocket, Type};
use std::io;
use std::net::SocketAddr;
use std::os::unix::io::{FromRawFd, IntoRawFd};

/// Classic BPF for SO_ATTACH_REUSEPORT_CBPF: pick the listener (shard) from a hash of the
/// client's source address, so every connection of one client lands on one shard.
fn source_ip_program(ipv6: bool, nr_shards: u32) -> Vec<libc::sock_filter> {
    // The program sees the TCP header at offset 0; SKF_NET_OFF reaches the IP header.
    const SKF_NET_OFF: i32 = -0x100000;
    let ins = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    // IPv4: source address at 12; IPv6: the last 32 bits of the source address (8 + 12).
    let src = if ipv6 { 20 } else { 12 };
    vec![
        ins(
            (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            (SKF_NET_OFF + src) as u32,
        ),
        ins(
            (libc::BPF_ALU | libc::BPF_MUL | libc::BPF_K) as u16,
            0x9E37_79B1,
        ),
        ins((libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K) as u16, 16),
        ins(
            (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16,
            nr_shards.max(1),
        ),
        ins((libc::BPF_RET | libc::BPF_A) as u16, 0),
    ]
}

fn attach_source_ip_steering(fd: i32, ipv6: bool, nr_shards: u32) -> io::Result<()> {
    let prog = source_ip_program(ipv6, nr_shards);
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: fprog points at `prog`, alive for the call; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            &fprog as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bind `addr` with SO_REUSEPORT and the given backlog, for the current shard's executor.
/// With `steer_shards`, connections are spread over the shards by client address instead of
/// by the kernel's 4-tuple hash (the program applies to the whole reuseport group).
pub fn bind(addr: SocketAddr, backlog: u32, steer_shards: Option<u32>) -> io::Result<TcpListener> {
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let sk = RawSocket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    sk.set_reuse_address(true)?;
    sk.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // [::] serves IPv6 only; an IPv4 service is configured on its own.
        sk.set_only_v6(true)?;
    }
    sk.set_nonblocking(true)?;
    sk.bind(&SockAddr::from(addr))?;
    sk.listen(backlog.min(i32::MAX as u32) as i32)?;
    if let Some(n) = steer_shards {
        attach_source_ip_steering(
            std::os::unix::io::AsRawFd::as_raw_fd(&sk),
            addr.is_ipv6(),
            n,
        )?;
    }
    // SAFETY: the fd is a freshly bound, listening TCP socket whose ownership moves here.
    Ok(unsafe { TcpListener::from_raw_fd(sk.into_raw_fd()) })
}

/// A shard's TCP stream. Reads try a plain non-blocking `recv` first and only fall back to
/// glommio's readiness wait when nothing is there: glommio arms an io_uring poll after every
/// partial read, and each such poll's completion interrupts the busy shard (task work, an IPI),
/// which costs more than the read itself. Writes go straight to glommio (a direct `send`).
pub struct Socket(pub glommio::net::TcpStream);

impl Socket {
    pub fn get_ref(&self) -> &glommio::net::TcpStream {
        &self.0
    }
}

impl std::os::unix::io::AsRawFd for Socket {
    fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        self.0.as_raw_fd()
    }
}

impl futures_lite::AsyncRead for Socket {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<io::Result<usize>> {
        use std::os::unix::io::AsRawFd;
        let this = self.get_mut();
        if !buf.is_empty() {
            // SAFETY: recv into a buffer we own, of its length; MSG_DONTWAIT never blocks.
            let rc = unsafe {
                libc::recv(
                    this.0.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if rc >= 0 {
                return std::task::Poll::Ready(Ok(rc as usize));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                return std::task::Poll::Ready(Err(e));
            }
        }
        std::pin::Pin::new(&mut this.0).poll_read(cx, buf)
    }
}

impl futures_lite::AsyncWrite for Socket {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_close(cx)
    }
}
