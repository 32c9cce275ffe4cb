//! A client connection between requests: its stream (plain or TLS), the facts that outlive
//! one request, and the shard's parking lot, where an idle keep-alive connection waits with
//! no task of its own. Owns idle timeouts; knows nothing of HTTP.
//!
//! Why park: a task that awaits the next request keeps its whole future (over a kilobyte)
//! and a timer per connection. A parked connection is its stream, its facts and one entry
//! in the lot's deadline index; its socket's readiness wakes the lot, which gives it a task
//! again. Idle Lync clients number in the thousands per appliance; this is what they cost.

use crate::log::ConnectionRecord;
use crate::net::Socket;
use crate::shard::{ClientGuard, Shard};
use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Poll, RawWaker, RawWakerVTable, Waker};
use std::time::{Duration, Instant};

/// A client's stream: plain, or TLS terminated here.
pub type ClientStream = crate::net::Stream<futures_rustls::server::TlsStream<Socket>>;

/// The client's socket under its stream, for the socket options and queries the stream does
/// not offer (None for an HTTP/2 stream's in-process link).
pub fn socket_fd(stream: &ClientStream) -> Option<std::os::unix::io::RawFd> {
    use std::os::unix::io::AsRawFd;
    match stream {
        ClientStream::Plain(s) => Some(s.as_raw_fd()),
        ClientStream::Tls(t) => Some(t.get_ref().0.as_raw_fd()),
        ClientStream::Link(_) => None,
    }
}

/// What is known of a client connection beyond one request: for routing, limits and the
/// connection log.
pub struct ConnFacts {
    /// The virtual service, in the configuration `origin`.
    pub vs_idx: usize,
    /// The same, by slot: found again in a later configuration.
    pub vs_slot: usize,
    /// The configuration generation `vs_idx` belongs to (kept while the connection lives:
    /// a request on it may still be answered under that configuration).
    pub origin: Rc<Shard>,
    /// The listening address it came in on.
    pub listen: SocketAddr,
    pub peer: SocketAddr,
    /// "http" or "https" (X-Forwarded-Proto).
    pub proto: &'static str,
    pub sni: Option<Box<str>>,
    /// The negotiated TLS version, for the logs.
    pub tls: Option<&'static str>,
    pub opened: Instant,
    pub requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// A tcp service's real server (its ServerId), for the connection log; u32::MAX: none.
    pub real_server: u32,
    /// An HTTP/2 stream's link to the request path: its connection has the connection
    /// record and counts; this one only serves the request.
    pub bridged: bool,
}

impl ConnFacts {
    pub fn record(&self, shard: &Shard, event: &str, reason: Option<&str>) {
        let Some(vs) = self.service(shard) else {
            return; // its service left the configuration
        };
        if vs.logging.connection {
            shard.log.connection(&ConnectionRecord {
                event,
                client: self.peer,
                service: &vs.name,
                shard: shard.id,
                duration: self.opened.elapsed(),
                bytes_in: self.bytes_in,
                bytes_out: self.bytes_out,
                requests: self.requests,
                reason,
                tls: self.tls,
                sni: self.sni.as_deref(),
                real_server: shard
                    .config
                    .servers
                    .get(self.real_server as usize)
                    .map(|s| s.name.as_str()),
            });
        }
    }
}

/// A client connection with a task or without: everything it needs to go on.
impl ConnFacts {
    /// The connection's virtual service in `shard`'s configuration (None: removed by a reload).
    pub fn service<'a>(&self, shard: &'a Shard) -> Option<&'a crate::config::VirtualService> {
        if self.origin.generation == shard.generation {
            shard.config.services.get(self.vs_idx)
        } else {
            shard
                .config
                .services
                .iter()
                .find(|v| v.slot == self.vs_slot)
        }
    }
}

pub struct Client {
    pub stream: ClientStream,
    pub facts: ConnFacts,
    /// Holds the connection's place in the shard's, service's and client's limits.
    pub guard: ClientGuard,
}

/// A new connection: the connection record and the service's connection counters.
pub fn opened(shard: &Shard, facts: &ConnFacts) {
    let counters = &shard.metrics.services[facts.vs_slot];
    counters
        .connections_active
        .set(counters.connections_active.get() + 1);
    counters
        .connections_total
        .set(counters.connections_total.get() + 1);
    facts.record(shard, "open", None);
}

/// Close a client connection for good: a TLS close_notify and a FIN (bounded), the
/// connection record and the active-connection gauge. After the client's own close
/// ("client": its EOF) nobody reads a close_notify: the descriptor just closes (a send, an
/// encryption and a shutdown less per connection that a client ends).
pub async fn close(shard: &Shard, mut client: Client, reason: &'static str) {
    if reason != "client" {
        let _ = crate::io::timeout(
            Duration::from_secs(1),
            futures_lite::AsyncWriteExt::close(&mut client.stream),
        )
        .await;
    }
    if client.facts.bridged {
        return;
    }
    closed(shard, &client.facts, reason);
}

/// A client connection's end in the connection log and the active-connection gauge.
pub fn closed(shard: &Shard, facts: &ConnFacts, reason: &'static str) {
    facts.record(shard, "close", Some(reason));
    let counters = &shard.metrics.services[facts.vs_slot];
    counters
        .connections_active
        .set(counters.connections_active.get().saturating_sub(1));
}

/// A place in the lot, taken before the connection's socket is told whom to wake.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Ticket {
    idx: u32,
    gen: u32,
}

impl Ticket {
    fn pack(self) -> usize {
        ((self.idx as usize) << 32) | self.gen as usize
    }
    fn unpack(d: usize) -> Ticket {
        Ticket {
            idx: (d >> 32) as u32,
            gen: d as u32,
        }
    }
}

// A ticket travels inside a waker's data word.
const _: () = assert!(usize::BITS == 64, "tickets are packed into 64-bit words");

struct Slot {
    gen: u32,
    /// Reserved (`None` until parked), or parked with its deadline.
    client: Option<(Client, Instant)>,
}

/// This shard's idle keep-alive connections, by ticket, and their idle deadlines in order.
#[derive(Default)]
pub struct ParkingLot {
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    /// (deadline, place) of every parked client: one entry each.
    deadlines: RefCell<BTreeSet<(Instant, u32)>>,
}

thread_local! {
    /// Tickets whose sockets became readable, and the lot's task to tell. A parked
    /// connection's waker only ever runs on its shard's thread (the shard's poller wakes it).
    static READY: RefCell<Vec<Ticket>> = const { RefCell::new(Vec::new()) };
    static LOT_TASK: RefCell<Option<Waker>> = const { RefCell::new(None) };
    /// Set when the lot's task must look again (a ticket is ready, or an earlier deadline).
    static POKED: Cell<bool> = const { Cell::new(false) };
}

fn wake_lot() {
    POKED.with(|p| p.set(true));
    LOT_TASK.with(|w| {
        if let Some(w) = w.borrow().as_ref() {
            w.wake_by_ref();
        }
    });
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(
    |d| RawWaker::new(d, &VTABLE),
    |d| ticket_ready(d as usize),
    |d| ticket_ready(d as usize),
    |_| {},
);

fn ticket_ready(d: usize) {
    READY.with(|r| r.borrow_mut().push(Ticket::unpack(d)));
    wake_lot();
}

impl ParkingLot {
    /// Take a place; `waker` is what the connection's socket should wake when it speaks.
    pub fn reserve(&self) -> Ticket {
        let mut slots = self.slots.borrow_mut();
        let idx = match self.free.borrow_mut().pop() {
            Some(i) => i,
            None => {
                slots.push(Slot {
                    gen: 0,
                    client: None,
                });
                (slots.len() - 1) as u32
            }
        };
        Ticket {
            idx,
            gen: slots[idx as usize].gen,
        }
    }

    pub fn waker(t: Ticket) -> Waker {
        // SAFETY: the vtable's functions only read the data word as a number; nothing is
        // pointed to, so clones and drops need no bookkeeping.
        unsafe { Waker::from_raw(RawWaker::new(t.pack() as *const (), &VTABLE)) }
    }

    /// Give a place back unused.
    pub fn cancel(&self, t: Ticket) {
        let mut slots = self.slots.borrow_mut();
        if let Some(s) = slots.get_mut(t.idx as usize) {
            if s.gen == t.gen && s.client.is_none() {
                s.gen = s.gen.wrapping_add(1);
                self.free.borrow_mut().push(t.idx);
            }
        }
    }

    /// Park `client` at its reserved place until it speaks or `deadline` passes. A place not
    /// reserved by this ticket (a bug) hands the client back, to be closed.
    #[must_use]
    pub fn park(&self, t: Ticket, client: Client, deadline: Instant) -> Option<Client> {
        let mut slots = self.slots.borrow_mut();
        let Some(s) = slots.get_mut(t.idx as usize) else {
            return Some(client);
        };
        if s.gen != t.gen || s.client.is_some() {
            return Some(client);
        }
        s.client = Some((client, deadline));
        let mut d = self.deadlines.borrow_mut();
        let earliest = d.first().map(|k| k.0);
        d.insert((deadline, t.idx));
        if earliest.is_none_or(|e| deadline < e) {
            wake_lot(); // its timer must be set earlier
        }
        None
    }

    /// Take a parked client out (it spoke, timed out or the shard closes).
    fn take(&self, idx: u32, gen: Option<u32>) -> Option<Client> {
        let mut slots = self.slots.borrow_mut();
        let s = slots.get_mut(idx as usize)?;
        if gen.is_some_and(|g| g != s.gen) {
            return None;
        }
        let (client, deadline) = s.client.take()?;
        s.gen = s.gen.wrapping_add(1);
        self.free.borrow_mut().push(idx);
        self.deadlines.borrow_mut().remove(&(deadline, idx));
        Some(client)
    }

    pub fn nr_parked(&self) -> usize {
        self.deadlines.borrow().len()
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.borrow().first().map(|k| k.0)
    }

    fn expired(&self, now: Instant) -> Option<Client> {
        let first = *self.deadlines.borrow().first()?;
        if first.0 > now {
            return None;
        }
        self.take(first.1, None)
    }
}

/// The lot's task: gives a connection that spoke a task again, closes those idle past their
/// timeout, and at shutdown closes every parked one.
pub async fn run_lot(state: Rc<crate::shard::State>) {
    let lot = &state.lot;
    let mut ready: Vec<Ticket> = Vec::new();
    loop {
        READY.with(|r| std::mem::swap(&mut *r.borrow_mut(), &mut ready));
        for t in ready.drain(..) {
            if let Some(c) = lot.take(t.idx, Some(t.gen)) {
                // the connection's next request takes the current configuration
                let s = state.current();
                crate::shard::spawn_connection(c.facts.peer, Box::pin(crate::proxy::serve(s, c)));
            }
        }
        let now = Instant::now();
        while let Some(c) = lot.expired(now) {
            let s = state.current();
            glommio::spawn_local(async move { close(&s, c, "idle_timeout").await }).detach();
        }
        if state.is_closing() {
            while let Some(c) = lot.next_deadline().and_then(|d| lot.expired(d)) {
                let s = state.current();
                if c.facts.requests == 0 {
                    // accepted, first request not there yet: it is served, then closed
                    crate::shard::spawn_connection(
                        c.facts.peer,
                        Box::pin(crate::proxy::serve(s, c)),
                    );
                } else {
                    glommio::spawn_local(async move { close(&s, c, "shutdown").await }).detach();
                }
            }
        }
        // Sleep until a parked socket speaks, the next deadline or shutdown.
        let next = lot.next_deadline();
        let woken = std::future::poll_fn(|cx| {
            LOT_TASK.with(|w| {
                let mut w = w.borrow_mut();
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
            });
            if POKED.with(|p| p.replace(false)) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        let timer = async {
            match next {
                Some(d) => glommio::timer::sleep(d.saturating_duration_since(Instant::now())).await,
                None => std::future::pending::<()>().await,
            }
        };
        let closing = async {
            if !state.is_closing() {
                state.closed().await
            } else {
                std::future::pending::<()>().await
            }
        };
        futures_lite::future::or(woken, futures_lite::future::or(timer, closing)).await;
    }
}
