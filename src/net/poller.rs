//! Socket readiness for one shard: an edge-triggered epoll set whose own readiness the shard's
//! glommio ring waits for. Owns the readiness flags and wakers of every data-path socket on
//! this thread; knows nothing of HTTP.
//!
//! Why not glommio's per-socket io_uring polls: glommio 0.9 arms one POLL_ADD per wait and
//! creates its rings without IORING_SETUP_COOP_TASKRUN, so every completion that lands while
//! the shard is busy interrupts it (task work and a reschedule IPI), and every wait costs a
//! failed `recv` first. Here each socket is registered once; a busy shard collects the
//! readiness of all its sockets with one `epoll_wait(0)` per batch and never arms anything,
//! and only a shard with nothing left to do waits, through one io_uring poll of the epoll fd,
//! so sleeping and timers stay glommio's.

use futures_lite::AsyncRead;
use std::cell::RefCell;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Events collected per `epoll_wait`.
const BATCH: usize = 256;

#[derive(Default)]
struct Slot {
    /// Bumped whenever the slot is freed: an event for an older registration is ignored.
    gen: u32,
    /// The socket may have data (or EOF/error) to read; cleared only when a read finds none.
    readable: bool,
    writable: bool,
    /// The peer closed its side or the socket failed: a short read no longer means drained.
    hup: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

/// A socket's registration: its slot and the slot's generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    idx: u32,
    gen: u32,
}

impl Key {
    fn data(self) -> u64 {
        (u64::from(self.idx) << 32) | u64::from(self.gen)
    }
    fn from_data(d: u64) -> Key {
        Key {
            idx: (d >> 32) as u32,
            gen: d as u32,
        }
    }
}

pub struct Poller {
    epfd: OwnedFd,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    /// Wakers collected by one `collect`, kept to reuse the allocation.
    woken: RefCell<Vec<Waker>>,
    /// What one `epoll_wait` fills, kept to reuse the allocation.
    events: RefCell<Vec<libc::epoll_event>>,
}

thread_local! {
    static POLLER: RefCell<Option<std::rc::Rc<Poller>>> = const { RefCell::new(None) };
}

/// This thread's poller; created on first use.
pub fn current() -> io::Result<std::rc::Rc<Poller>> {
    POLLER.with(|p| {
        let mut p = p.borrow_mut();
        if let Some(p) = p.as_ref() {
            return Ok(p.clone());
        }
        // SAFETY: plain syscall; the returned fd is checked and then owned.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let poller = std::rc::Rc::new(Poller {
            // SAFETY: fd is a fresh epoll descriptor nobody else owns.
            epfd: unsafe { OwnedFd::from_raw_fd(fd) },
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            woken: RefCell::new(Vec::new()),
            events: RefCell::new(vec![libc::epoll_event { events: 0, u64: 0 }; BATCH]),
        });
        *p = Some(poller.clone());
        Ok(poller)
    })
}

impl Poller {
    /// Register `fd` for edge-triggered read and write readiness. `readable` is the initial
    /// guess (a freshly accepted socket may already hold its request).
    pub fn register(&self, fd: RawFd, readable: bool, writable: bool) -> io::Result<Key> {
        let key = {
            let mut slots = self.slots.borrow_mut();
            let idx = take_slot(&mut slots, &mut self.free.borrow_mut());
            let s = &mut slots[idx as usize];
            s.readable = readable;
            s.writable = writable;
            s.hup = false;
            Key { idx, gen: s.gen }
        };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: key.data(),
        };
        // SAFETY: valid epoll fd and event struct for the call's duration.
        let rc =
            unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            self.release(key);
            return Err(e);
        }
        Ok(key)
    }

    /// Forget a registration; call when closing its fd (closing removes it from epoll, and
    /// an event already collected for it is ignored by its generation).
    pub fn release(&self, key: Key) {
        let mut slots = self.slots.borrow_mut();
        if let Some(s) = slots.get_mut(key.idx as usize) {
            if s.gen == key.gen {
                *s = Slot {
                    gen: s.gen.wrapping_add(1),
                    ..Slot::default()
                };
                self.free.borrow_mut().push(key.idx);
            }
        }
    }

    /// Run `op` if the socket may be readable; when it reports `WouldBlock`, or reads less
    /// than asked on a socket that has not hung up, readiness is cleared and the task waits.
    pub fn poll_read_with(
        &self,
        key: Key,
        cx: &mut Context<'_>,
        want: usize,
        mut op: impl FnMut() -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        if self.with(key, |s| s.readable) {
            match retry(&mut op) {
                Ok(n) => {
                    if n < want && n > 0 {
                        // Short read: the socket is drained unless it has hung up; data
                        // arriving after this read raises a new edge.
                        self.with(key, |s| s.readable = s.hup);
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.with(key, |s| s.readable = false)
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.with(key, |s| store(&mut s.read_waker, cx.waker()));
        Poll::Pending
    }

    /// Run `op` (a write) unless the socket is known full; `WouldBlock` makes the task wait
    /// for the next writable edge.
    pub fn poll_write_with(
        &self,
        key: Key,
        cx: &mut Context<'_>,
        mut op: impl FnMut() -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        if self.with(key, |s| s.writable) {
            match retry(&mut op) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.with(key, |s| s.writable = false)
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.with(key, |s| store(&mut s.write_waker, cx.waker()));
        Poll::Pending
    }

    /// Take the socket as readable again (bytes were left in it after a peek).
    pub fn mark_readable(&self, key: Key) {
        self.with(key, |s| s.readable = true)
    }

    pub fn may_be_readable(&self, key: Key) -> bool {
        self.with(key, |s| s.readable)
    }

    /// Ready once the socket is writable (a non-blocking connect finished, well or badly).
    pub fn poll_writable(&self, key: Key, cx: &mut Context<'_>) -> Poll<()> {
        let ready = self.with(key, |s| {
            if !(s.writable || s.hup) {
                store(&mut s.write_waker, cx.waker());
            }
            s.writable || s.hup
        });
        if ready {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn with<T: Default>(&self, key: Key, f: impl FnOnce(&mut Slot) -> T) -> T {
        let mut slots = self.slots.borrow_mut();
        match slots.get_mut(key.idx as usize) {
            Some(s) if s.gen == key.gen => f(s),
            _ => T::default(),
        }
    }

    /// Collect what is ready, waiting at most `wait`; returns the number of events.
    fn collect(&self, wait: Duration) -> usize {
        let mut events = self.events.borrow_mut();
        let n = if wait.is_zero() {
            // SAFETY: `events` is a valid, writable array of its length.
            unsafe {
                libc::epoll_wait(
                    self.epfd.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    0,
                )
            }
        } else {
            let ts = libc::timespec {
                tv_sec: wait.as_secs() as libc::time_t,
                tv_nsec: wait.subsec_nanos() as libc::c_long,
            };
            // SAFETY: valid array and timespec for the call; no signal mask change.
            unsafe {
                libc::epoll_pwait2(
                    self.epfd.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    &ts,
                    std::ptr::null(),
                )
            }
        };
        if n <= 0 {
            return 0;
        }
        let n = n as usize;
        let mut wake = std::mem::take(&mut *self.woken.borrow_mut());
        {
            let mut slots = self.slots.borrow_mut();
            for ev in &events[..n] {
                let key = Key::from_data(ev.u64);
                let Some(s) = slots.get_mut(key.idx as usize) else {
                    continue;
                };
                if s.gen != key.gen {
                    continue; // a socket closed since
                }
                let bits = ev.events as i32;
                let failed = bits & (libc::EPOLLERR | libc::EPOLLHUP) != 0;
                if failed || bits & libc::EPOLLRDHUP != 0 {
                    s.hup = true;
                }
                if failed || bits & (libc::EPOLLIN | libc::EPOLLRDHUP) != 0 {
                    s.readable = true;
                    wake.extend(s.read_waker.take());
                }
                if failed || bits & libc::EPOLLOUT != 0 {
                    s.writable = true;
                    wake.extend(s.write_waker.take());
                }
            }
        }
        // Woken outside the borrow: a waker may run code that touches the slots.
        for w in wake.drain(..) {
            w.wake();
        }
        *self.woken.borrow_mut() = wake;
        n
    }
}

/// A free slot's index (reused, or a new one at the end): both engines' socket tables.
pub(super) fn take_slot<T: Default>(slots: &mut Vec<T>, free: &mut Vec<u32>) -> u32 {
    free.pop().unwrap_or_else(|| {
        slots.push(T::default());
        (slots.len() - 1) as u32
    })
}

/// Run a non-blocking syscall, again if a signal interrupted it.
fn retry(op: &mut impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Keep `w` as the waker to wake, unless the one kept already wakes the same task.
pub(super) fn store(slot: &mut Option<Waker>, w: &Waker) {
    match slot {
        Some(old) if old.will_wake(w) => {}
        _ => *slot = Some(w.clone()),
    }
}

/// The shard's readiness loop: while anything is ready, dispatch it and let the woken tasks
/// run; when nothing is and no other task ran since the last look, wait in `epoll_wait` for
/// up to `poll_before_park`; after that, sleep until the epoll fd becomes readable (one
/// io_uring poll in glommio's ring, so timers and cross-shard messages still wake the shard).
///
/// Why wait before parking: glommio's park and wake-up cost a memory barrier across cores
/// (`membarrier`), ring set-up and a poll of the epoll fd, several microseconds, where a
/// request arriving within the window costs one system call, as in HAProxy's event loop.
/// Timers and cross-shard messages wait at most that long.
pub async fn run(poller: std::rc::Rc<Poller>, poll_before_park: Duration) {
    drive(&*poller, poll_before_park).await
}

/// What a shard's I/O loop needs of its engine (epoll here, `uring`'s ring).
pub(super) trait Engine {
    /// Dispatch what is ready, waiting at most `wait`; the number of events.
    fn collect(&self, wait: Duration) -> usize;
    /// About to sleep: the fd whose readability ends the sleep, or None if work turned up
    /// (then the loop goes on instead).
    fn before_park(&self) -> Option<RawFd>;
    fn after_park(&self) {}
}

impl Engine for Poller {
    fn collect(&self, wait: Duration) -> usize {
        Poller::collect(self, wait)
    }
    fn before_park(&self) -> Option<RawFd> {
        Some(self.epfd.as_raw_fd())
    }
}

/// The loop both engines run (see `run`).
pub(super) async fn drive(engine: &impl Engine, poll_before_park: Duration) {
    let mut quiet = false;
    loop {
        if engine.collect(Duration::ZERO) > 0 {
            quiet = false;
            futures_lite::future::yield_now().await;
            continue;
        }
        if !quiet {
            // Let every runnable task run once, then see whether anything else did.
            let _ = glommio::executor().executor_stats();
            futures_lite::future::yield_now().await;
            quiet = glommio::executor().executor_stats().tasks_executed() <= 1;
            if quiet && !poll_before_park.is_zero() && engine.collect(poll_before_park) > 0 {
                quiet = false;
                futures_lite::future::yield_now().await;
            }
            continue;
        }
        quiet = false;
        let Some(fd) = engine.before_park() else {
            futures_lite::future::yield_now().await;
            continue;
        };
        let r = wait_readable(fd).await;
        engine.after_park();
        if let Err(e) = r {
            tracing::error!("shard readiness wait failed: {e}");
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
}

/// Wait until `fd` is readable through glommio's own ring. glommio 0.9 has no public "wait
/// for an fd" call; a glommio stream arms exactly that poll when it is created, so a
/// short-lived stream over a duplicate of the fd is the wait. The stream is asked once, to
/// register our waker with its poll; the next wake-up ends the wait without asking again
/// (that would be a `recv` on a non-socket). A spurious wake-up costs nothing worse: the
/// caller looks at the epoll set and waits again if it is empty.
pub(super) async fn wait_readable(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall; the duplicate is owned by the stream below and closed with it.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a descriptor we own; the stream takes ownership.
    let mut waiter = unsafe { glommio::net::TcpStream::from_raw_fd(dup) };
    let mut armed = false;
    std::future::poll_fn(|cx| {
        if armed {
            return Poll::Ready(());
        }
        armed = true;
        let mut b = [0u8; 1];
        // Pending: the poll is armed with our waker. Ready: it had fired already.
        match std::pin::Pin::new(&mut waiter).poll_read(cx, &mut b) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(()),
        }
    })
    .await;
    Ok(())
}
