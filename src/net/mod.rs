//! Sockets of the data path: listeners (one per shard and virtual service, bound with
//! SO_REUSEPORT so the kernel spreads connections over shards), accepted and connected
//! streams, and their readiness (`poller`). No HTTP here.

pub mod link;
mod poller;
pub mod splice;
mod uring;

use poller::Poller;
use socket2::{Domain, Protocol, SockAddr, Socket as RawSocket, Type};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::unix::io::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

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

/// SO_DETACH_REUSEPORT_BPF (asm-generic/socket.h; not in the libc crate for every arch).
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;

/// Set (or remove, with None) the source-IP steering program of the reuseport group `fd`
/// belongs to: for sockets handed over by another process, whose group may have been set up
/// for another number of shards or without steering.
pub fn set_steering(fd: i32, ipv6: bool, nr_shards: Option<u32>) -> io::Result<()> {
    match nr_shards {
        Some(n) => attach_source_ip_steering(fd, ipv6, n),
        None => {
            let zero: libc::c_int = 0;
            // SAFETY: setsockopt on a socket we hold, with a valid int.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    SO_DETACH_REUSEPORT_BPF,
                    &zero as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            let err = io::Error::last_os_error();
            // ENOENT: there was no program to detach
            if rc != 0 && err.raw_os_error() != Some(libc::ENOENT) {
                return Err(err);
            }
            Ok(())
        }
    }
}

/// Is something already listening on `addr` (another process: SO_REUSEPORT would let us join
/// its sockets silently and split its traffic)? Read from /proc/net/tcp{,6}: a listening
/// socket on the port whose address is `addr`'s or a wildcard (a TIME_WAIT leftover, which
/// a probe bind would trip on, does not count).
pub fn in_use(addr: SocketAddr) -> bool {
    let (file, wildcard) = match addr {
        SocketAddr::V4(_) => ("/proc/net/tcp", IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        SocketAddr::V6(_) => ("/proc/net/tcp6", IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
    };
    let Ok(text) = std::fs::read_to_string(file) else {
        return false;
    };
    text.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 4 || f[3] != "0A" {
            return false; // not LISTEN
        }
        let Some((ip, port)) = f[1].split_once(':') else {
            return false;
        };
        if u16::from_str_radix(port, 16).ok() != Some(addr.port()) {
            return false;
        }
        let ip = proc_ip(ip);
        ip == Some(addr.ip()) || ip == Some(wildcard) || addr.ip().is_unspecified()
    })
}

/// `in_use`, giving a process that has just died a moment to let go of its sockets: an
/// io_uring request keeps a listening socket open until the kernel tears the ring down, a
/// few milliseconds after the exit (a restart right after a kill would otherwise be refused).
/// Sleeps: for the main thread, never a shard.
pub fn in_use_settled(addr: SocketAddr) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while in_use(addr) {
        if std::time::Instant::now() >= deadline {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// An address as /proc/net/tcp prints it: 32-bit words in host byte order, in hex.
fn proc_ip(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| {
        hex.get(i * 8..i * 8 + 8)
            .and_then(|w| u32::from_str_radix(w, 16).ok())
            .map(u32::to_ne_bytes)
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Bind `addr` with SO_REUSEPORT and the given backlog (non-blocking). With `steer_shards`,
/// connections are spread over the shards by client address instead of by the kernel's
/// 4-tuple hash (the program applies to the whole reuseport group).
pub fn bind(addr: SocketAddr, backlog: u32, steer_shards: Option<u32>) -> io::Result<RawSocket> {
    let domain = Domain::for_address(addr);
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
        attach_source_ip_steering(sk.as_raw_fd(), addr.is_ipv6(), n)?;
    }
    Ok(sk)
}

/// How a shard's sockets are driven (`runtime.io_engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Readiness from an edge-triggered epoll set, then plain `recv`/`send` (see `poller`).
    Epoll,
    /// A ring of the shard's own: multishot receive into this many provided 16 KiB buffers
    /// (a power of two), batched sends (see `uring`).
    IoUring { buffers: u16 },
}

/// Start this shard's I/O loop; every data-path socket of the shard depends on it.
pub fn start_engine(shard: usize, engine: Engine, poll_before_park: Duration) -> io::Result<()> {
    match engine {
        Engine::Epoll => {
            let poller = poller::current()?;
            crate::runtime::supervise(shard, "poller", poller::run(poller, poll_before_park));
        }
        Engine::IoUring { buffers } => {
            let ring = uring::start(buffers)?;
            crate::runtime::supervise(shard, "ring", uring::run(ring, poll_before_park));
        }
    }
    Ok(())
}

/// A socket registered with this shard's engine; dropping it closes the socket.
enum Registered {
    Epoll {
        fd: OwnedFd,
        key: poller::Key,
        poller: Rc<Poller>,
    },
    /// The ring's slot owns the descriptor (it closes it once the kernel is done with it).
    Uring {
        key: uring::Key,
        ring: Rc<uring::Uring>,
    },
}

impl Registered {
    /// `connected`: data may arrive at once (an accepted socket); a connecting socket waits
    /// for its connect first.
    fn new(fd: OwnedFd, connected: bool) -> io::Result<Registered> {
        if let Some(ring) = uring::current() {
            let key = ring.register(fd, connected, false);
            return Ok(Registered::Uring { key, ring });
        }
        let poller = poller::current()?;
        let key = poller.register(fd.as_raw_fd(), connected, connected)?;
        Ok(Registered::Epoll { fd, key, poller })
    }

    fn listener(fd: OwnedFd) -> io::Result<Registered> {
        if let Some(ring) = uring::current() {
            let key = ring.register(fd, false, true);
            return Ok(Registered::Uring { key, ring });
        }
        let poller = poller::current()?;
        let key = poller.register(fd.as_raw_fd(), true, false)?;
        Ok(Registered::Epoll { fd, key, poller })
    }

    fn fd(&self) -> RawFd {
        match self {
            Registered::Epoll { fd, .. } => fd.as_raw_fd(),
            Registered::Uring { key, ring } => ring.fd(*key),
        }
    }

    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            Registered::Epoll { key, poller, .. } => poller.poll_writable(*key, cx),
            Registered::Uring { key, ring } => ring.poll_writable(*key, cx),
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        match self {
            Registered::Epoll { key, poller, .. } => poller.release(*key),
            Registered::Uring { key, ring } => ring.release(*key),
        }
    }
}

fn cvt(rc: isize) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// A data-path listener: accepts on the shard's poller.
pub struct Listener(Registered);

impl Listener {
    /// Take over a bound, listening, non-blocking socket (from `bind`).
    pub fn new(sk: RawSocket) -> io::Result<Listener> {
        // SAFETY: the fd comes out of an owned socket and is owned from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(sk.into_raw_fd()) };
        Ok(Listener(Registered::listener(fd)?))
    }

    /// The next connection and its peer's address. The accepted socket is non-blocking,
    /// close-on-exec, with TCP_NODELAY (responses are written whole; nothing to coalesce).
    pub async fn accept(&self) -> io::Result<(Socket, SocketAddr)> {
        let mut peer: Option<SocketAddr> = None;
        let accept = |fd: RawFd, peer: &mut Option<SocketAddr>| {
            // SAFETY: sockaddr_storage fits any address; the kernel writes at most `len`.
            let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            // SAFETY: valid listening fd and out-pointers to our stack.
            let rc = unsafe {
                libc::accept4(
                    fd,
                    &mut ss as *mut _ as *mut libc::sockaddr,
                    &mut len,
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            let fd = cvt(rc as isize)?;
            *peer = sockaddr(&ss);
            Ok(fd)
        };
        let n = std::future::poll_fn(|cx| match &self.0 {
            // want 0: an accept never counts as a short read; accept until none is left
            Registered::Epoll { fd, key, poller } => {
                poller.poll_read_with(*key, cx, 0, || accept(fd.as_raw_fd(), &mut peer))
            }
            Registered::Uring { key, ring } => {
                ring.poll_accept_with(*key, cx, |fd| accept(fd, &mut peer))
            }
        })
        .await?;
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(n as RawFd) };
        let peer = peer.ok_or_else(|| io::Error::other("accepted a socket of no IP family"))?;
        // SAFETY: borrowed view of our own fd, to set an option; not closed here.
        let view = std::mem::ManuallyDrop::new(unsafe { RawSocket::from_raw_fd(fd.as_raw_fd()) });
        let _ = view.set_nodelay(true);
        Ok((Socket(Registered::new(fd, true)?), peer))
    }
}

fn sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Connect to `addr` within `dur` (non-blocking connect, then the writable edge and the
/// socket's error). A timeout is `TimedOut`; a refusal is the kernel's error.
pub async fn connect(addr: SocketAddr, dur: Duration) -> io::Result<Socket> {
    let domain = Domain::for_address(addr);
    let sk = RawSocket::new(
        domain,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    let _ = sk.set_nodelay(true);
    match sk.connect(&SockAddr::from(addr)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // SAFETY: the fd comes out of an owned socket and is owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(sk.into_raw_fd()) };
    let s = Socket(Registered::new(fd, false)?);
    crate::io::timeout(dur, async {
        std::future::poll_fn(|cx| s.0.poll_writable(cx)).await;
        Ok(())
    })
    .await?;
    // SAFETY: borrowed view of our own fd, only to read SO_ERROR; it is not closed here.
    let view = std::mem::ManuallyDrop::new(unsafe { RawSocket::from_raw_fd(s.as_raw_fd()) });
    if let Some(e) = view.take_error()? {
        return Err(e);
    }
    Ok(s)
}

/// A shard's TCP stream. On epoll, reads and writes are plain non-blocking syscalls, made
/// only when the shard's poller says the socket may be ready (see `poller` for why not
/// glommio's own); on io_uring, they take from and add to the ring's buffers (see `uring`).
pub struct Socket(Registered);

impl Socket {
    /// Look at the bytes waiting without taking them: returns once more than `seen` are
    /// there (or at EOF: 0). Reading a PROXY header this way leaves what follows it where
    /// the TLS handshake or the HTTP reader will find it.
    pub async fn peek_more(&self, buf: &mut [u8], seen: usize) -> io::Result<usize> {
        std::future::poll_fn(|cx| match &self.0 {
            Registered::Uring { key, ring } => ring.poll_peek(*key, cx, buf, seen),
            Registered::Epoll { fd, key, poller } => {
                poller.poll_read_with(*key, cx, buf.len(), || {
                    // SAFETY: recv into a buffer we own, of its length; never blocks.
                    let n = cvt(unsafe {
                        libc::recv(
                            fd.as_raw_fd(),
                            buf.as_mut_ptr() as *mut libc::c_void,
                            buf.len(),
                            libc::MSG_PEEK | libc::MSG_DONTWAIT,
                        )
                    })?;
                    if n != 0 && n <= seen {
                        // nothing new: wait for the next edge
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    Ok(n)
                })
            }
        })
        .await
    }

    /// Take `n` bytes a peek saw (they are there: no waiting).
    pub fn discard(&self, n: usize) -> io::Result<()> {
        let (fd, key, poller) = match &self.0 {
            Registered::Uring { key, ring } => return ring.discard(*key, n),
            Registered::Epoll { fd, key, poller } => (fd, key, poller),
        };
        let mut scratch = [0u8; 1024];
        let mut left = n;
        while left > 0 {
            let want = left.min(scratch.len());
            // SAFETY: recv into our stack buffer, of at most its length; never blocks.
            let got = cvt(unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    scratch.as_mut_ptr() as *mut libc::c_void,
                    want,
                    libc::MSG_DONTWAIT,
                )
            })?;
            if got == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            left -= got;
        }
        // what follows may already be there: the next read must try
        poller.mark_readable(*key);
        Ok(())
    }

    /// Is an idle socket still clean: nothing (data, EOF, an error) has arrived since its last
    /// read? A socket the engine has seen nothing arrive on is taken as clean without asking
    /// the kernel unless `ask` (it idled long enough for a peer's own idle close to be likely).
    pub fn is_clean(&self, ask: bool) -> bool {
        let (fd, key, poller) = match &self.0 {
            // where the ring's receive is armed, what it has not delivered has not arrived
            Registered::Uring { key, ring } => return ring.is_clean(*key),
            Registered::Epoll { fd, key, poller } => (fd, key, poller),
        };
        if !ask && !poller.may_be_readable(*key) {
            return true;
        }
        let mut b = [0u8; 1];
        // SAFETY: recv on a valid fd with a 1-byte stack buffer; MSG_DONTWAIT never blocks.
        let rc = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                b.as_mut_ptr() as *mut libc::c_void,
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    }

    /// Run the caller's read-side system call on the socket (splice) when it may be
    /// readable, with `poller`'s rules for `want`. Epoll only: see `is_direct`.
    fn poll_read_raw(
        &self,
        cx: &mut Context<'_>,
        want: usize,
        mut op: impl FnMut(RawFd) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        match &self.0 {
            Registered::Epoll { fd, key, poller } => {
                poller.poll_read_with(*key, cx, want, || op(fd.as_raw_fd()))
            }
            Registered::Uring { .. } => Poll::Ready(Err(io::ErrorKind::Unsupported.into())),
        }
    }

    /// The write-side twin of `poll_read_raw`.
    fn poll_write_raw(
        &self,
        cx: &mut Context<'_>,
        mut op: impl FnMut(RawFd) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        match &self.0 {
            Registered::Epoll { fd, key, poller } => {
                poller.poll_write_with(*key, cx, || op(fd.as_raw_fd()))
            }
            Registered::Uring { .. } => Poll::Ready(Err(io::ErrorKind::Unsupported.into())),
        }
    }

    /// On io_uring, bytes arrive in the ring's buffers, not the socket: nothing may read the
    /// socket past them (splice).
    pub fn is_direct(&self) -> bool {
        matches!(self.0, Registered::Epoll { .. })
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.0.fd()
    }
}

impl futures_lite::AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.get_mut()).poll_read(cx, buf)
    }
}

impl futures_lite::AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.get_mut()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &self.0 {
            Registered::Uring { key, ring } => ring.poll_write(*key, cx, bufs),
            Registered::Epoll { fd, key, poller } => poller.poll_write_with(*key, cx, || {
                // SAFETY: msghdr over the caller's slices (IoSlice is iovec-compatible),
                // alive for the call; never blocks, no SIGPIPE.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
                msg.msg_iovlen = bufs.len().min(1024) as _;
                cvt(unsafe {
                    libc::sendmsg(
                        fd.as_raw_fd(),
                        &msg,
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                })
            }),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.get_mut()).poll_flush(cx)
    }

    /// Half-close: our FIN goes out; reading goes on (a lingering close drains after it).
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.get_mut()).poll_close(cx)
    }
}

// Reading and writing one socket from two futures at once (a bridge pumping both ways): both
// engines keep a reader's and a writer's waker apart, so `&Socket` may do both.
impl futures_lite::AsyncRead for &Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        match &self.0 {
            Registered::Uring { key, ring } => ring.poll_read(*key, cx, buf),
            Registered::Epoll { fd, key, poller } => {
                poller.poll_read_with(*key, cx, buf.len(), || {
                    // SAFETY: recv into a buffer we own, of its length; MSG_DONTWAIT never
                    // blocks.
                    cvt(unsafe {
                        libc::recv(
                            fd.as_raw_fd(),
                            buf.as_mut_ptr() as *mut libc::c_void,
                            buf.len(),
                            libc::MSG_DONTWAIT,
                        )
                    })
                })
            }
        }
    }
}

impl futures_lite::AsyncWrite for &Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &self.0 {
            Registered::Uring { key, ring } => ring.poll_write(*key, cx, &[io::IoSlice::new(buf)]),
            Registered::Epoll { fd, key, poller } => poller.poll_write_with(*key, cx, || {
                // SAFETY: send from a buffer we borrow, of its length; never blocks, no
                // SIGPIPE.
                cvt(unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        buf.as_ptr() as *const libc::c_void,
                        buf.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                })
            }),
        }
    }

    /// Written bytes are the engine's at once (the ring sends what is buffered at the end of
    /// the turn), so there is nothing to wait for; a failed earlier send shows here.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.0 {
            Registered::Uring { key, ring } => Poll::Ready(ring.send_error(*key)),
            Registered::Epoll { .. } => Poll::Ready(Ok(())),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Registered::Uring { key, ring } = &self.0 {
            // the FIN must follow the bytes still buffered
            match ring.poll_drained(*key, cx) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
        }
        // SAFETY: shutdown on our own fd.
        let rc = unsafe { libc::shutdown(self.0.fd(), libc::SHUT_WR) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOTCONN) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The plain socket under a stream, if it is one and its bytes are read from the socket
/// itself (what splice can move bytes between; not on io_uring).
pub trait AsPlain {
    fn as_plain(&self) -> Option<&Socket>;
}

impl<T> AsPlain for Stream<T> {
    fn as_plain(&self) -> Option<&Socket> {
        match self {
            Stream::Plain(s) if s.is_direct() => Some(s),
            _ => None,
        }
    }
}

/// A shard's stream, plain or with TLS over it (`T`: rustls's client or server stream; boxed,
/// its state is large). Client connections and connections to real servers both use it.
pub enum Stream<T> {
    Plain(Socket),
    Tls(Box<T>),
    /// An in-process link (an HTTP/2 stream's request, to the request path).
    Link(link::End),
}

impl<T: futures_lite::AsyncRead + Unpin> futures_lite::AsyncRead for Stream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Link(l) => Pin::new(l).poll_read(cx, buf),
        }
    }
}

impl<T: futures_lite::AsyncWrite + Unpin> futures_lite::AsyncWrite for Stream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Link(l) => Pin::new(l).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Link(l) => Pin::new(l).poll_flush(cx),
        }
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_close(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
            Stream::Link(l) => Pin::new(l).poll_close(cx),
        }
    }
}
