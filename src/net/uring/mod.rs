//! The io_uring engine (`runtime.io_engine = "io_uring"`): the same sockets as `poller`, driven
//! by a ring of the shard's own instead of readiness. Knows nothing of HTTP.
//!
//! - The ring is set up with COOP_TASKRUN, TASKRUN_FLAG, SINGLE_ISSUER and DEFER_TASKRUN:
//!   completions never interrupt a busy shard; they are run when the shard asks for them, and
//!   a turn with nothing to submit and no completion pending makes no system call at all.
//! - Every connection has one multishot receive into a ring of provided buffers: an idle
//!   connection holds no receive buffer, and data is already in user space when a reader asks.
//!   A socket whose unread data reaches `RX_LIMIT` (or `RX_BUFS` buffers) has its receive
//!   cancelled and is read directly from then on (`bulk`); when the pool runs dry, the
//!   sockets that found it empty are too (`starved`).
//! - Writes are copied into the socket's send buffer and all sends of a loop turn go to the
//!   kernel in one `io_uring_enter`; one send is in flight per socket, so bytes stay in order.
//! - Listeners have one multishot POLLIN and accept with accept4 (see `arm_accept` for why
//!   not a multishot accept).
//! - Writes of 16 KiB or more with nothing buffered go out directly, as on epoll: copying a
//!   bulk body into the send buffer cost more than the system call it saves (docs/bench.md).
//!
//! Direct system calls on a ring socket are kept to where they cannot reorder bytes: bulk
//! sends with nothing buffered, a dropped socket's unsent bytes (one try before the ring),
//! and reads of a socket whose receive is not armed (the pool ran dry).

mod buffers;

use super::poller::store;
use buffers::{Buffers, Chunk};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The size of each provided receive buffer (`runtime.io_uring_buffers` of them per shard:
/// address space, touched only as traffic needs it).
const BUF_SIZE: usize = 16 * 1024;
const BGID: u16 = 7;
/// Unread bytes a socket may hold before its receive pauses (back-pressure on a fast sender).
const RX_LIMIT: usize = 64 * 1024;
/// Buffers a socket may hold, however few bytes they carry (one per received segment).
const RX_BUFS: usize = RX_LIMIT / BUF_SIZE;
/// Unsent bytes a socket may buffer before a write waits.
const TX_LIMIT: usize = 64 * 1024;
/// Writes at least this large skip the buffer (see `send_direct`).
const DIRECT_SEND: usize = 16 * 1024;
const RING_ENTRIES: u32 = 1024;
/// How long a dropped socket's unsent bytes may take to leave before it is closed anyway.
const LINGER: Duration = Duration::from_secs(10);

const OP_RECV: u64 = 1;
const OP_SEND: u64 = 2;
const OP_POLLOUT: u64 = 3;
const OP_ACCEPT: u64 = 4;
/// A starved socket's wait for data to read directly.
const OP_POLLIN: u64 = 6;
/// Cancellations: their completions carry nothing we need.
const OP_IGNORE: u64 = 5;

/// A socket's registration: its slot and the slot's generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    idx: u32,
    gen: u32,
}

fn user_data(key: Key, op: u64) -> u64 {
    (u64::from(key.idx) << 32) | (u64::from(key.gen & 0xff_ffff) << 8) | op
}

#[derive(Default)]
struct Slot {
    gen: u32,
    fd: RawFd,
    /// Owned by a `Socket` or `Listener`; false once dropped (the slot closes its fd when the
    /// ring no longer uses it).
    live: bool,
    /// Operations the kernel holds for this slot.
    ops: u32,
    rx: VecDeque<Chunk>,
    /// Bytes read directly for a peek while no buffer could be had (they follow `rx`).
    spill: Vec<u8>,
    /// Unread bytes: `rx` and `spill`.
    rx_bytes: usize,
    recv_armed: bool,
    /// The pool ran dry under this socket's receive: it is read directly (after a POLLIN)
    /// until enough buffers are back to re-arm the receive.
    starved: bool,
    pollin_armed: bool,
    /// A bulk sender filled `RX_LIMIT`: its receive is cancelled and it is read directly into
    /// the reader's (large) buffer after a POLLIN, as on epoll, until it idles (`is_clean`).
    /// Sixteen 16 KiB completions and a cancel per MiB cost more than one recv per buffer.
    bulk: bool,
    eof: bool,
    rx_err: Option<i32>,
    read_waker: Option<Waker>,
    /// A listener's multishot POLLIN is armed, and it has fired since accept4 last found
    /// the queue empty.
    accept_armed: bool,
    acceptable: bool,
    /// Bytes written and not yet handed to the kernel, and the send in flight.
    tx: Vec<u8>,
    flight: Vec<u8>,
    flight_off: usize,
    sending: bool,
    dirty: bool,
    tx_err: Option<i32>,
    write_waker: Option<Waker>,
    writable: bool,
    pollout_armed: bool,
    close_by: Option<Instant>,
}

impl Slot {
    fn key(&self, idx: u32) -> Key {
        Key { idx, gen: self.gen }
    }
}

pub struct Uring {
    ring: RefCell<IoUring>,
    bufs: Buffers,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    /// Slots with writes to hand to the kernel this turn.
    dirty: RefCell<Vec<u32>>,
    starved: RefCell<Vec<u32>>,
    /// Dropped slots still waiting for the kernel (sends to finish, cancellations).
    closing: RefCell<Vec<u32>>,
    /// Signalled by the kernel when completions are pending: what a parked shard waits on.
    eventfd: OwnedFd,
    woken: RefCell<Vec<Waker>>,
    /// Send buffers between uses: a socket holds one only while it has bytes to send, so an
    /// idle connection holds none, and steady traffic allocates none.
    spare: RefCell<Vec<Vec<u8>>>,
    /// The loop is parked in glommio: work queued meanwhile (an accept to arm, a send) must
    /// wake it, since nothing reaches the kernel until it runs.
    parked: Cell<bool>,
}

thread_local! {
    static URING: RefCell<Option<Rc<Uring>>> = const { RefCell::new(None) };
}

/// This thread's ring, if the engine was started on it.
pub fn current() -> Option<Rc<Uring>> {
    URING.with(|u| u.borrow().clone())
}

/// Set up this thread's ring (the shard's thread: the ring has a single issuer), with
/// `buffers` provided receive buffers (a power of two).
pub fn start(buffers: u16) -> io::Result<Rc<Uring>> {
    if let Some(u) = current() {
        return Ok(u);
    }
    let ring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(RING_ENTRIES * 4)
        .build(RING_ENTRIES)?;
    let bufs = Buffers::new(buffers)?;
    // SAFETY: the entries live as long as `bufs`, which the ring's owner outlives... the ring
    // is dropped before `bufs` (field order), so the kernel never sees them freed.
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(bufs.ring as u64, bufs.count, BGID, 0)?;
    }
    // SAFETY: plain syscall; the descriptor is checked and then owned.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
    ring.submitter().register_eventfd(efd)?;
    let u = Rc::new(Uring {
        ring: RefCell::new(ring),
        bufs,
        slots: RefCell::new(Vec::new()),
        free: RefCell::new(Vec::new()),
        dirty: RefCell::new(Vec::new()),
        starved: RefCell::new(Vec::new()),
        closing: RefCell::new(Vec::new()),
        eventfd,
        woken: RefCell::new(Vec::new()),
        spare: RefCell::new(Vec::new()),
        parked: Cell::new(false),
    });
    URING.with(|x| *x.borrow_mut() = Some(u.clone()));
    Ok(u)
}

impl Uring {
    /// Take ownership of `fd`: a connected socket (`connected`: writable at once), a
    /// connecting one (writable once `poll_writable` says so) or a listener (accepting).
    pub fn register(&self, fd: OwnedFd, connected: bool, listener: bool) -> Key {
        let key = {
            let mut slots = self.slots.borrow_mut();
            let idx = super::poller::take_slot(&mut slots, &mut self.free.borrow_mut());
            let s = &mut slots[idx as usize];
            s.fd = std::os::unix::io::IntoRawFd::into_raw_fd(fd);
            s.live = true;
            s.writable = connected;
            s.key(idx)
        };
        // A socket's receive is armed by its first read, not here: a connection closed unread
        // (refused by a limit) then holds nothing in the ring and closes at once.
        if listener {
            self.arm_accept(key);
        }
        key
    }

    pub fn fd(&self, key: Key) -> RawFd {
        self.with(key, |s| s.fd).unwrap_or(-1)
    }

    fn with<T>(&self, key: Key, f: impl FnOnce(&mut Slot) -> T) -> Option<T> {
        let mut slots = self.slots.borrow_mut();
        match slots.get_mut(key.idx as usize) {
            Some(s) if s.gen == key.gen => Some(f(s)),
            _ => None,
        }
    }

    /// Wake a parked loop: there is work for the kernel. Through the eventfd it waits on, so
    /// the park ends the one way it always does: dropping glommio's poll of it mid-flight
    /// instead (a second future raced against it) made idle shards spin.
    fn kick(&self) {
        if self.parked.replace(false) {
            let one: u64 = 1;
            // SAFETY: an 8-byte write to our own non-blocking eventfd.
            unsafe {
                libc::write(
                    self.eventfd.as_raw_fd(),
                    &one as *const u64 as *const libc::c_void,
                    8,
                )
            };
        }
    }

    /// Queue an entry; a full submission queue is handed to the kernel first.
    fn push(&self, e: squeue::Entry) {
        self.kick();
        let mut ring = self.ring.borrow_mut();
        // SAFETY: every entry's buffers (send buffers, the provided-buffer ring) outlive the
        // operation: they belong to slots that are freed only once `ops` is back to zero.
        while unsafe { ring.submission().push(&e) }.is_err() {
            if let Err(err) = ring.submit() {
                tracing::error!("io_uring submit failed: {err}");
            }
        }
    }

    fn start_receive(&self, key: Key) {
        let fd = self.with(key, |s| {
            let go = s.live && !s.recv_armed && !s.eof && s.rx_err.is_none();
            if go {
                s.recv_armed = true;
                s.ops += 1;
            }
            go.then_some(s.fd)
        });
        if let Some(Some(fd)) = fd {
            self.push(
                opcode::RecvMulti::new(types::Fd(fd), BGID)
                    .build()
                    .user_data(user_data(key, OP_RECV)),
            );
        }
    }

    /// A listener's readiness: a multishot POLLIN, after which `poll_accept` calls accept4
    /// until the backlog is empty. (A multishot accept would take the whole backlog into the
    /// process at once, hundreds of descriptors in a flood, where accept4 takes one per call
    /// and leaves the rest queued in the kernel.)
    fn arm_accept(&self, key: Key) {
        let fd = self.with(key, |s| {
            let go = s.live && !s.accept_armed;
            if go {
                s.accept_armed = true;
                s.acceptable = true;
                s.ops += 1;
            }
            go.then_some(s.fd)
        });
        if let Some(Some(fd)) = fd {
            self.push(
                opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                    .multi(true)
                    .build()
                    .user_data(user_data(key, OP_ACCEPT)),
            );
        }
    }

    fn cancel(&self, key: Key, op: u64) {
        self.push(
            opcode::AsyncCancel::new(user_data(key, op))
                .build()
                .user_data(user_data(key, OP_IGNORE)),
        );
    }

    /// Copy received bytes into `buf`; `peek` leaves them queued.
    fn take(&self, s: &mut Slot, buf: &mut [u8], peek: bool) -> usize {
        let mut n = 0;
        let mut returned = false;
        if peek {
            for c in s.rx.iter() {
                let b = self.bufs.bytes(c);
                let k = b.len().min(buf.len() - n);
                buf[n..n + k].copy_from_slice(&b[..k]);
                n += k;
                if n == buf.len() {
                    return n;
                }
            }
            let k = s.spill.len().min(buf.len() - n);
            buf[n..n + k].copy_from_slice(&s.spill[..k]);
            return n + k;
        }
        while n < buf.len() {
            let Some(c) = s.rx.front_mut() else { break };
            let b = self.bufs.bytes(c);
            let k = b.len().min(buf.len() - n);
            buf[n..n + k].copy_from_slice(&b[..k]);
            n += k;
            c.off += k as u32;
            c.len -= k as u32;
            if c.len == 0 {
                let bid = c.bid;
                s.rx.pop_front();
                self.bufs.put(bid);
                returned = true;
            }
        }
        if n < buf.len() && s.rx.is_empty() && !s.spill.is_empty() {
            let k = s.spill.len().min(buf.len() - n);
            buf[n..n + k].copy_from_slice(&s.spill[..k]);
            s.spill.drain(..k);
            n += k;
        }
        s.rx_bytes -= n;
        if returned {
            self.bufs.publish();
        }
        n
    }

    /// Read what has arrived; with nothing there, wait (re-arming the receive if it paused).
    pub fn poll_read(
        &self,
        key: Key,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_read_inner(key, cx, buf, None)
    }

    /// Like `poll_read` without taking the bytes: ready once more than `seen` are queued.
    pub fn poll_peek(
        &self,
        key: Key,
        cx: &mut Context<'_>,
        buf: &mut [u8],
        seen: usize,
    ) -> Poll<io::Result<usize>> {
        self.poll_read_inner(key, cx, buf, Some(seen))
    }

    fn poll_read_inner(
        &self,
        key: Key,
        cx: &mut Context<'_>,
        buf: &mut [u8],
        peek: Option<usize>,
    ) -> Poll<io::Result<usize>> {
        enum Next {
            Done(io::Result<usize>, bool),
            Wait(bool),
            Direct(RawFd),
            Spill(RawFd),
        }
        let r = self.with(key, |s| {
            let have = match peek {
                Some(seen) => s.rx_bytes > seen,
                None => s.rx_bytes > 0,
            };
            if have {
                let n = self.take(s, buf, peek.is_some());
                return Next::Done(Ok(n), !s.starved && !s.bulk);
            }
            if let Some(e) = s.rx_err {
                return Next::Done(Err(io::Error::from_raw_os_error(e)), false);
            }
            if s.eof {
                // at EOF a peek that sees nothing new reports the end, as a read does
                return Next::Done(Ok(0), false);
            }
            store(&mut s.read_waker, cx.waker());
            // direct only once no receive can deliver bytes behind the ones read here
            if (s.starved || s.bulk) && !s.recv_armed && peek.is_none() {
                return Next::Direct(s.fd);
            }
            if peek.is_some() && (s.starved || s.bulk) && !s.recv_armed {
                // a peek (a PROXY header) cannot wait for buffers to come back
                return Next::Spill(s.fd);
            }
            Next::Wait(!s.starved && !s.bulk)
        });
        let Some(next) = r else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        match next {
            Next::Done(r, rearm) => {
                if rearm {
                    self.start_receive(key);
                }
                Poll::Ready(r)
            }
            Next::Wait(rearm) => {
                if rearm {
                    self.start_receive(key);
                }
                Poll::Pending
            }
            Next::Direct(fd) => self.read_direct(key, fd, buf),
            Next::Spill(fd) => {
                let mut more = [0u8; 2048];
                match self.read_direct(key, fd, &mut more) {
                    Poll::Ready(Ok(0)) => Poll::Ready(Ok(0)),
                    Poll::Ready(Ok(n)) => {
                        self.with(key, |s| {
                            s.spill.extend_from_slice(&more[..n]);
                            s.rx_bytes += n;
                        });
                        self.poll_read_inner(key, cx, buf, peek)
                    }
                    other => other,
                }
            }
        }
    }

    /// A starved socket: no receive buffer is free for it, so its bytes are still in the
    /// kernel. Read them into the caller's buffer, or wait for POLLIN.
    fn read_direct(&self, key: Key, fd: RawFd, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        // SAFETY: recv into the caller's buffer, of its length; never blocks.
        let rc = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if rc > 0 {
            return Poll::Ready(Ok(rc as usize));
        }
        if rc == 0 {
            self.with(key, |s| s.eof = true);
            return Poll::Ready(Ok(0));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
            return Poll::Ready(Err(e));
        }
        let arm = self
            .with(key, |s| {
                let arm = !s.pollin_armed;
                if arm {
                    s.pollin_armed = true;
                    s.ops += 1;
                }
                arm
            })
            .unwrap_or(false);
        if arm {
            self.push(
                opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                    .build()
                    .user_data(user_data(key, OP_POLLIN)),
            );
        }
        Poll::Pending
    }

    /// Drop `n` queued bytes (a peek saw them).
    pub fn discard(&self, key: Key, n: usize) -> io::Result<()> {
        let mut scratch = [0u8; 512];
        let mut left = n;
        while left > 0 {
            let k = left.min(scratch.len());
            let got = self
                .with(key, |s| self.take(s, &mut scratch[..k], false))
                .unwrap_or(0);
            if got == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            left -= got;
        }
        self.start_receive(key);
        Ok(())
    }

    /// An idle socket with nothing arrived (no data, EOF or error)? Where the ring's receive
    /// is not armed (bulk, starved, never read), the kernel is asked, and a clean socket gets
    /// its receive (back).
    pub fn is_clean(&self, key: Key) -> bool {
        let ask = self.with(key, |s| {
            if s.rx_bytes > 0 || s.eof || s.rx_err.is_some() {
                return None;
            }
            Some((!s.recv_armed, s.fd))
        });
        let Some(Some((ask, fd))) = ask else {
            return false;
        };
        if !ask {
            return true;
        }
        let mut b = [0u8; 1];
        // SAFETY: recv on our fd into a 1-byte stack buffer; MSG_DONTWAIT never blocks.
        let rc = unsafe {
            libc::recv(
                fd,
                b.as_mut_ptr() as *mut libc::c_void,
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        let clean = rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock;
        if clean {
            self.with(key, |s| s.bulk = false);
            self.start_receive(key);
        }
        clean
    }

    /// Buffer `bufs` for this turn's send; waits while `TX_LIMIT` bytes are unsent.
    pub fn poll_write(
        &self,
        key: Key,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total >= DIRECT_SEND {
            if let Some(r) = self.send_direct(key, cx, bufs) {
                return r;
            }
        }
        let r = self.with(key, |s| {
            if let Some(e) = s.tx_err {
                return Some(Err(io::Error::from_raw_os_error(e)));
            }
            let room = TX_LIMIT.saturating_sub(s.tx.len());
            if room == 0 {
                store(&mut s.write_waker, cx.waker());
                return None;
            }
            if s.tx.capacity() == 0 {
                s.tx = self.spare.borrow_mut().pop().unwrap_or_default();
            }
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(room - n);
                s.tx.extend_from_slice(&b[..k]);
                n += k;
                if n == room {
                    break;
                }
            }
            let mark = n > 0 && !s.dirty && !s.sending;
            if mark {
                s.dirty = true;
            }
            Some(Ok((n, mark)))
        });
        match r {
            None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            Some(None) => Poll::Pending,
            Some(Some(Err(e))) => Poll::Ready(Err(e)),
            Some(Some(Ok((n, mark)))) => {
                if mark {
                    self.dirty.borrow_mut().push(key.idx);
                    self.kick();
                }
                Poll::Ready(Ok(n))
            }
        }
    }

    /// A bulk write with nothing buffered before it: sent at once from the caller's buffer, as
    /// epoll does (copying it would cost more than the system call saves); when the socket is
    /// full, wait for POLLOUT. None: bytes are buffered, so this one queues behind them.
    fn send_direct(
        &self,
        key: Key,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Option<Poll<io::Result<usize>>> {
        let mut iov = [io::IoSlice::new(&[]); 9];
        // the socket's buffered bytes (not yet handed to the ring) go first, in the same call
        let (fd, queued) = self.with(key, |s| {
            if s.tx_err.is_some() {
                return None;
            }
            if s.sending || s.pollout_armed {
                // a bulk write waits for the ring's send (or room) rather than being copied
                store(&mut s.write_waker, cx.waker());
                return Some((-1, 0));
            }
            Some((s.fd, s.tx.len()))
        })??;
        if fd < 0 {
            return Some(Poll::Pending);
        }
        let tx_ptr = self
            .with(key, |s| (s.tx.as_ptr(), s.tx.len()))
            .unwrap_or((std::ptr::null(), 0));
        let mut n = 0;
        if queued > 0 {
            // SAFETY: the slot's buffer, alive and unchanged until the call returns.
            iov[0] = io::IoSlice::new(unsafe { std::slice::from_raw_parts(tx_ptr.0, tx_ptr.1) });
            n = 1;
        }
        for b in bufs.iter().take(iov.len() - n) {
            iov[n] = io::IoSlice::new(b);
            n += 1;
        }
        // SAFETY: msghdr over live slices (IoSlice is iovec-compatible); never blocks, no
        // SIGPIPE.
        let rc = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = n as _;
            libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        let sent = rc.max(0) as usize;
        if queued > 0 && sent > 0 {
            self.with(key, |s| {
                s.tx.drain(..sent.min(queued));
            });
        }
        if sent > queued {
            return Some(Poll::Ready(Ok(sent - queued)));
        }
        if let Some(e) = err {
            if e.kind() != io::ErrorKind::WouldBlock {
                return Some(Poll::Ready(Err(e)));
            }
        }
        // full (or only the queued bytes went): wait for room; what is still queued goes by
        // the ring at the end of the turn
        let arm = self.with(key, |s| {
            store(&mut s.write_waker, cx.waker());
            s.writable = false;
            let arm = !s.pollout_armed;
            if arm {
                s.pollout_armed = true;
                s.ops += 1;
            }
            arm
        });
        if arm == Some(true) {
            self.push(
                opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32)
                    .build()
                    .user_data(user_data(key, OP_POLLOUT)),
            );
        }
        Some(Poll::Pending)
    }

    /// A send that failed since the last write, if any.
    pub fn send_error(&self, key: Key) -> io::Result<()> {
        match self.with(key, |s| s.tx_err) {
            Some(Some(e)) => Err(io::Error::from_raw_os_error(e)),
            _ => Ok(()),
        }
    }

    /// Ready once every buffered byte has left (or failed): before a shutdown.
    pub fn poll_drained(&self, key: Key, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.with(key, |s| {
            if let Some(e) = s.tx_err {
                return Some(Err(io::Error::from_raw_os_error(e)));
            }
            if s.tx.is_empty() && !s.sending {
                return Some(Ok(()));
            }
            store(&mut s.write_waker, cx.waker());
            None
        }) {
            None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            Some(None) => Poll::Pending,
            Some(Some(r)) => Poll::Ready(r),
        }
    }

    /// Ready once a connecting socket is writable (its connect finished, well or badly).
    pub fn poll_writable(&self, key: Key, cx: &mut Context<'_>) -> Poll<()> {
        enum W {
            Ready,
            Wait,
            Arm(RawFd),
        }
        let w = self
            .with(key, |s| {
                if s.writable {
                    return W::Ready;
                }
                store(&mut s.write_waker, cx.waker());
                if s.pollout_armed {
                    return W::Wait;
                }
                s.pollout_armed = true;
                s.ops += 1;
                W::Arm(s.fd)
            })
            .unwrap_or(W::Ready);
        match w {
            W::Ready => Poll::Ready(()),
            W::Wait => Poll::Pending,
            W::Arm(fd) => {
                self.push(
                    opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32)
                        .build()
                        .user_data(user_data(key, OP_POLLOUT)),
                );
                Poll::Pending
            }
        }
    }

    /// Run `op` (accept4 on the listener) while the listener may have connections queued;
    /// `WouldBlock` waits for the next POLLIN.
    pub fn poll_accept_with(
        &self,
        key: Key,
        cx: &mut Context<'_>,
        mut op: impl FnMut(RawFd) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let Some((fd, acceptable, armed)) =
            self.with(key, |s| (s.fd, s.acceptable, s.accept_armed))
        else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        if !armed {
            self.arm_accept(key);
        }
        if acceptable || !armed {
            loop {
                match op(fd) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    r => return Poll::Ready(r),
                }
            }
        }
        self.with(key, |s| {
            s.acceptable = false;
            store(&mut s.read_waker, cx.waker());
        });
        Poll::Pending
    }

    /// The socket is dropped: stop receiving, let unsent bytes leave, close when the kernel
    /// holds nothing of it.
    pub fn release(&self, key: Key) {
        let mut cancels = Vec::new();
        let mut closing = false;
        self.with(key, |s| {
            s.live = false;
            s.read_waker = None;
            s.write_waker = None;
            while let Some(c) = s.rx.pop_front() {
                self.bufs.put(c.bid);
            }
            s.rx_bytes = 0;
            self.bufs.publish();
            if s.recv_armed {
                cancels.push(OP_RECV);
            }
            if s.accept_armed {
                cancels.push(OP_ACCEPT);
            }
            if s.pollout_armed {
                cancels.push(OP_POLLOUT);
            }
            if s.pollin_armed {
                cancels.push(OP_POLLIN);
            }
            if !s.tx.is_empty() && !s.sending && s.tx_err.is_none() {
                // One direct try: usually the whole answer fits in the socket at once.
                // SAFETY: send from our own buffer, of its length; never blocks.
                let rc = unsafe {
                    libc::send(
                        s.fd,
                        s.tx.as_ptr() as *const libc::c_void,
                        s.tx.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                if rc > 0 {
                    s.tx.drain(..rc as usize);
                } else if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock {
                    s.tx.clear();
                }
            }
            s.close_by = Some(Instant::now() + LINGER);
            closing = true;
        });
        for op in cancels {
            self.cancel(key, op);
        }
        if closing && !self.finish(key.idx) {
            self.closing.borrow_mut().push(key.idx);
        }
    }

    /// Close and free a dropped slot the kernel no longer uses; false if it still does.
    fn finish(&self, idx: u32) -> bool {
        let mut slots = self.slots.borrow_mut();
        let s = &mut slots[idx as usize];
        if s.live || s.ops > 0 || (!s.tx.is_empty() && s.tx_err.is_none()) {
            return false;
        }
        // SAFETY: the slot owns the descriptor and nothing in the kernel refers to it.
        unsafe { libc::close(s.fd) };
        let gen = s.gen.wrapping_add(1) & 0xff_ffff;
        let (tx, flight, mut rx) = (
            std::mem::take(&mut s.tx),
            std::mem::take(&mut s.flight),
            std::mem::take(&mut s.rx),
        );
        rx.clear();
        *s = Slot {
            gen,
            fd: -1,
            rx,
            ..Slot::default()
        };
        drop(slots);
        self.give(tx);
        self.give(flight);
        self.free.borrow_mut().push(idx);
        true
    }

    /// Keep a send buffer for the next socket that writes (a few, of a usual size).
    fn give(&self, mut b: Vec<u8>) {
        let mut spare = self.spare.borrow_mut();
        if b.capacity() > 0 && b.capacity() <= 2 * TX_LIMIT && spare.len() < 256 {
            b.clear();
            spare.push(b);
        }
    }

    /// Hand the turn's sends to the kernel.
    fn flush(&self) {
        let dirty = std::mem::take(&mut *self.dirty.borrow_mut());
        for &idx in &dirty {
            self.send_next(idx);
        }
        let mut d = self.dirty.borrow_mut();
        if d.is_empty() {
            let mut dirty = dirty;
            dirty.clear();
            *d = dirty;
        }
    }

    fn send_next(&self, idx: u32) {
        let e = {
            let mut slots = self.slots.borrow_mut();
            let s = &mut slots[idx as usize];
            s.dirty = false;
            if s.sending || s.tx.is_empty() || s.tx_err.is_some() {
                return;
            }
            std::mem::swap(&mut s.tx, &mut s.flight);
            s.flight_off = 0;
            s.sending = true;
            s.ops += 1;
            opcode::Send::new(types::Fd(s.fd), s.flight.as_ptr(), s.flight.len() as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(user_data(s.key(idx), OP_SEND))
        };
        self.push(e);
    }

    /// Submit what is queued and dispatch what completed, waiting up to `wait` for at least
    /// one completion. Returns the number of completions.
    pub fn collect(&self, wait: Duration) -> usize {
        self.flush();
        self.rearm_starved();
        {
            let mut ring = self.ring.borrow_mut();
            let (pending, taskrun) = {
                let sq = ring.submission();
                (!sq.is_empty(), sq.taskrun())
            };
            let waiting = !wait.is_zero();
            if pending || taskrun || waiting {
                let r = if waiting {
                    let ts = types::Timespec::new()
                        .sec(wait.as_secs())
                        .nsec(wait.subsec_nanos());
                    let args = types::SubmitArgs::new().timespec(&ts);
                    ring.submitter().submit_with_args(1, &args)
                } else {
                    ring.submitter().submit()
                };
                match r {
                    Ok(_) => {}
                    Err(e)
                        if e.raw_os_error() == Some(libc::ETIME)
                            || e.raw_os_error() == Some(libc::EINTR)
                            || e.raw_os_error() == Some(libc::EBUSY) => {}
                    Err(e) => tracing::error!("io_uring enter failed: {e}"),
                }
            }
        }
        let mut n = 0;
        let mut wake = std::mem::take(&mut *self.woken.borrow_mut());
        loop {
            let cqe = {
                let mut ring = self.ring.borrow_mut();
                let mut cq = ring.completion();
                cq.next()
            };
            let Some(cqe) = cqe else { break };
            n += 1;
            self.complete(cqe.user_data(), cqe.result(), cqe.flags(), &mut wake);
        }
        self.bufs.publish();
        self.reap_closing();
        for w in wake.drain(..) {
            w.wake();
        }
        *self.woken.borrow_mut() = wake;
        n
    }

    /// Give starved sockets their receive back once a quarter of the pool is free again.
    fn rearm_starved(&self) {
        if self.starved.borrow().is_empty() || self.bufs.free.get() < u32::from(self.bufs.count) / 4
        {
            return;
        }
        let starved = std::mem::take(&mut *self.starved.borrow_mut());
        for idx in starved {
            let key = {
                let mut slots = self.slots.borrow_mut();
                let s = &mut slots[idx as usize];
                s.starved = false;
                s.key(idx)
            };
            self.start_receive(key);
        }
    }

    fn reap_closing(&self) {
        if self.closing.borrow().is_empty() {
            return;
        }
        let now = Instant::now();
        let list = std::mem::take(&mut *self.closing.borrow_mut());
        let mut keep = Vec::new();
        for idx in list {
            if self.finish(idx) {
                continue;
            }
            let overdue = {
                let mut slots = self.slots.borrow_mut();
                let s = &mut slots[idx as usize];
                let over = s.close_by.is_some_and(|t| now >= t) && s.tx_err.is_none();
                if over {
                    // the peer stopped reading: give up the unsent bytes
                    s.tx_err = Some(libc::ETIMEDOUT);
                    s.tx.clear();
                }
                over.then(|| (s.key(idx), s.sending))
            };
            if let Some((key, true)) = overdue {
                self.cancel(key, OP_SEND);
            }
            if !self.finish(idx) {
                keep.push(idx);
            }
        }
        self.closing.borrow_mut().extend(keep);
    }

    fn complete(&self, ud: u64, res: i32, flags: u32, wake: &mut Vec<Waker>) {
        let op = ud & 0xff;
        if op == OP_IGNORE {
            return;
        }
        let key = Key {
            idx: (ud >> 32) as u32,
            gen: ((ud >> 8) & 0xff_ffff) as u32,
        };
        let mut resend = false;
        let mut cancel_recv = false;
        let known = self.with(key, |s| {
            match op {
                OP_RECV => {
                    if !cqueue::more(flags) {
                        s.recv_armed = false;
                        s.ops -= 1;
                    }
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        self.bufs.free.set(self.bufs.free.get() - 1);
                        if res > 0 && s.live {
                            s.rx.push_back(Chunk {
                                bid,
                                off: 0,
                                len: res as u32,
                            });
                            s.rx_bytes += res as usize;
                            // in buffers too: tiny segments take a whole buffer each
                            let full = s.rx_bytes >= RX_LIMIT || s.rx.len() >= RX_BUFS;
                            if full && s.recv_armed && !s.bulk {
                                s.bulk = true;
                                cancel_recv = true;
                            }
                        } else {
                            self.bufs.put(bid);
                        }
                    }
                    if res == 0 {
                        s.eof = true;
                    } else if res == -libc::ENOBUFS {
                        if s.live && !s.starved {
                            s.starved = true;
                            self.starved.borrow_mut().push(key.idx);
                        }
                    } else if res < 0 && res != -libc::ECANCELED {
                        s.rx_err = Some(-res);
                    }
                    wake.extend(s.read_waker.take());
                }
                OP_SEND => {
                    if res < 0 {
                        s.sending = false;
                        s.ops -= 1;
                        s.tx_err = Some(if res == -libc::ECANCELED {
                            libc::ETIMEDOUT
                        } else {
                            -res
                        });
                        s.tx.clear();
                        s.flight.clear();
                        self.give(std::mem::take(&mut s.flight));
                    } else {
                        s.flight_off += res as usize;
                        if s.flight_off < s.flight.len() {
                            resend = true; // the rest of a partial send, still in flight
                        } else {
                            s.sending = false;
                            s.ops -= 1;
                            self.give(std::mem::take(&mut s.flight));
                            if !s.tx.is_empty() {
                                resend = true;
                            }
                        }
                    }
                    wake.extend(s.write_waker.take());
                }
                OP_POLLIN => {
                    s.pollin_armed = false;
                    s.ops -= 1;
                    wake.extend(s.read_waker.take());
                }
                OP_POLLOUT => {
                    s.pollout_armed = false;
                    s.ops -= 1;
                    s.writable = true;
                    wake.extend(s.write_waker.take());
                }
                OP_ACCEPT => {
                    if !cqueue::more(flags) {
                        s.accept_armed = false;
                        s.ops -= 1;
                    }
                    s.acceptable = true;
                    wake.extend(s.read_waker.take());
                }
                _ => {}
            }
        });
        if known.is_none() {
            return;
        }
        if cancel_recv {
            self.cancel(key, OP_RECV);
        }
        if resend {
            let e = {
                let mut slots = self.slots.borrow_mut();
                let s = &mut slots[key.idx as usize];
                if s.sending {
                    let off = s.flight_off;
                    // SAFETY: `off` < flight.len(); the buffer stays put while in flight.
                    Some(
                        opcode::Send::new(
                            types::Fd(s.fd),
                            unsafe { s.flight.as_ptr().add(off) },
                            (s.flight.len() - off) as u32,
                        )
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                        .user_data(user_data(key, OP_SEND)),
                    )
                } else {
                    None
                }
            };
            match e {
                Some(e) => self.push(e),
                None => self.send_next(key.idx),
            }
        }
    }

    /// Reset the eventfd's count: after this, any completion makes it readable again.
    fn quiet_eventfd(&self) {
        let mut b = [0u8; 8];
        // SAFETY: a non-blocking read of our own eventfd into an 8-byte buffer.
        unsafe {
            libc::read(
                self.eventfd.as_raw_fd(),
                b.as_mut_ptr() as *mut libc::c_void,
                8,
            )
        };
    }
}

/// The shard's loop for this engine: `poller::drive`, parked on the ring's eventfd.
pub async fn run(ring: Rc<Uring>, poll_before_park: Duration) {
    super::poller::drive(&*ring, poll_before_park).await
}

impl super::poller::Engine for Uring {
    fn collect(&self, wait: Duration) -> usize {
        Uring::collect(self, wait)
    }
    fn before_park(&self) -> Option<RawFd> {
        self.quiet_eventfd();
        if Uring::collect(self, Duration::ZERO) > 0 {
            return None;
        }
        self.parked.set(true);
        Some(self.eventfd.as_raw_fd())
    }
    fn after_park(&self) {
        self.parked.set(false);
    }
}
