//! HTTP/2 flood accounting, beside the `h2` crate (which parses every frame itself).
//!
//! The crate answers each PING and SETTINGS and applies each WINDOW_UPDATE, PRIORITY and empty
//! frame, but never tells its user about them: a client can keep a shard busy with frames that
//! ask for work and carry no request (CVE-2019-9512, -9515, -9518). This meter only follows
//! the frame boundaries of the bytes going by (the 9-byte headers; payloads are skipped, never
//! decoded) and keeps a budget per kind of frame that does no useful work. A connection that
//! spends one is closed with ENHANCE_YOUR_CALM and counted, as HAProxy and nginx do.

use std::cell::{Cell, RefCell};
use std::task::Waker;
use std::time::Instant;

/// What a connection abused, in the order of the `edgeshard_h2_abuse_total` kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abuse {
    RapidReset,
    Ping,
    Settings,
    WindowUpdate,
    Priority,
    EmptyFrames,
    Continuation,
    ProtocolError,
    /// Frames of types HTTP/2 does not define (to be ignored, but not without limit).
    UnknownFrames,
    /// Requests the h2 layer refused as malformed, beyond the budget.
    MalformedFlood,
}

impl Abuse {
    pub const ALL: [Abuse; 10] = [
        Abuse::RapidReset,
        Abuse::Ping,
        Abuse::Settings,
        Abuse::WindowUpdate,
        Abuse::Priority,
        Abuse::EmptyFrames,
        Abuse::Continuation,
        Abuse::ProtocolError,
        Abuse::UnknownFrames,
        Abuse::MalformedFlood,
    ];

    /// The metric label and security-log event suffix.
    pub fn label(self) -> &'static str {
        match self {
            Abuse::RapidReset => "rapid_reset",
            Abuse::Ping => "ping_flood",
            Abuse::Settings => "settings_flood",
            Abuse::WindowUpdate => "window_update_flood",
            Abuse::Priority => "priority_flood",
            Abuse::EmptyFrames => "empty_frames",
            Abuse::Continuation => "continuation_flood",
            Abuse::ProtocolError => "protocol_error",
            Abuse::UnknownFrames => "unknown_frames",
            Abuse::MalformedFlood => "malformed_flood",
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Abuse::RapidReset => "most streams reset by the client: connection closed",
            Abuse::Ping => "PING frames beyond the budget: connection closed",
            Abuse::Settings => "SETTINGS frames beyond the budget: connection closed",
            Abuse::WindowUpdate => {
                "WINDOW_UPDATE frames beyond what the data sent explains: connection closed"
            }
            Abuse::Priority => "PRIORITY frames beyond the budget: connection closed",
            Abuse::EmptyFrames => {
                "empty DATA/CONTINUATION frames beyond the budget: connection closed"
            }
            Abuse::Continuation => {
                "a header block in too many CONTINUATION frames: connection closed"
            }
            Abuse::ProtocolError => "HTTP/2 protocol error: connection closed by the h2 layer",
            Abuse::UnknownFrames => "frames of unknown types beyond the budget: connection closed",
            Abuse::MalformedFlood => "malformed requests beyond the budget: connection closed",
        }
    }

    /// The security-log event.
    pub fn event(self) -> &'static str {
        match self {
            Abuse::RapidReset => "h2_rapid_reset",
            Abuse::Ping => "h2_ping_flood",
            Abuse::Settings => "h2_settings_flood",
            Abuse::WindowUpdate => "h2_window_update_flood",
            Abuse::Priority => "h2_priority_flood",
            Abuse::EmptyFrames => "h2_empty_frames",
            Abuse::Continuation => "h2_continuation_flood",
            Abuse::ProtocolError => "h2_protocol_error",
            Abuse::UnknownFrames => "h2_unknown_frames",
            Abuse::MalformedFlood => "h2_malformed_flood",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const PRIORITY: u8 = 2;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const WINDOW_UPDATE: u8 = 8;
const RST_STREAM: u8 = 3;
/// RST_STREAM's PROTOCOL_ERROR: the h2 layer refused a malformed request (the request path
/// itself never resets with it).
const PROTOCOL_ERROR: u32 = 1;
const CONTINUATION: u8 = 9;
/// The highest frame type RFC 9113 defines.
const LAST_KNOWN: u8 = CONTINUATION;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// The client connection preface that precedes its first frame.
const PREFACE_LEN: usize = 24;
/// CONTINUATION frames one header block may take (the h2 crate bounds the block's size; this
/// bounds the frame count, so tiny frames cannot make a large one expensive).
const MAX_CONTINUATIONS: u32 = 64;

/// One frame header, and the first 4 bytes of its payload (an error code, a window
/// increment), zero-padded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub len: u32,
    pub first4: u32,
}

/// Follows frame boundaries across reads of any size; a frame is reported once its last
/// byte has gone by.
#[derive(Debug)]
pub struct Scanner {
    preface_left: usize,
    head: [u8; 9],
    head_len: usize,
    /// The frame whose payload is going by, and how much of it is left.
    current: Option<Frame>,
    skip: usize,
    /// Payload bytes seen of the current frame (up to 4 are kept).
    seen: usize,
}

impl Scanner {
    /// A client's byte stream (it starts with the preface).
    pub fn client() -> Scanner {
        Scanner {
            preface_left: PREFACE_LEN,
            head: [0; 9],
            head_len: 0,
            current: None,
            skip: 0,
            seen: 0,
        }
    }

    /// A server's byte stream (frames from the first byte).
    pub fn server() -> Scanner {
        Scanner {
            preface_left: 0,
            ..Scanner::client()
        }
    }

    pub fn scan(&mut self, mut data: &[u8], mut on_frame: impl FnMut(Frame)) {
        while !data.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(data.len());
                self.preface_left -= n;
                data = &data[n..];
            } else if let Some(f) = self.current.as_mut() {
                let n = self.skip.min(data.len());
                for &b in data[..n].iter().take(4usize.saturating_sub(self.seen)) {
                    f.first4 |= (b as u32) << (8 * (3 - self.seen));
                    self.seen += 1;
                }
                self.skip -= n;
                data = &data[n..];
                if self.skip == 0 {
                    on_frame(*f);
                    self.current = None;
                }
            } else {
                let n = (9 - self.head_len).min(data.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&data[..n]);
                self.head_len += n;
                data = &data[n..];
                if self.head_len == 9 {
                    let h = &self.head;
                    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
                    self.head_len = 0;
                    let f = Frame {
                        kind: h[3],
                        flags: h[4],
                        len,
                        first4: 0,
                    };
                    if len == 0 {
                        on_frame(f);
                    } else {
                        self.current = Some(f);
                        self.skip = len as usize;
                        self.seen = 0;
                    }
                }
            }
        }
    }
}

/// A refilling allowance of frames of one kind.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    credit: f64,
    burst: f64,
    per_sec: f64,
}

impl Bucket {
    const fn new(burst: f64, per_sec: f64) -> Bucket {
        Bucket {
            credit: burst,
            burst,
            per_sec,
        }
    }

    fn refill(&mut self, secs: f64) {
        // what was earned above the burst is kept until spent
        if self.credit < self.burst {
            self.credit = (self.credit + secs * self.per_sec).min(self.burst);
        }
    }

    /// Earned by useful work (a stream, data sent): may exceed the burst until spent.
    fn earn(&mut self, n: f64) {
        self.credit += n;
    }

    fn spend(&mut self) -> bool {
        self.credit -= 1.0;
        self.credit >= 0.0
    }
}

/// Budgets: a burst, a steady rate, and what useful work earns. Browsers send a handful of
/// SETTINGS and PRIORITY frames per connection, pings rarely, and a WINDOW_UPDATE or two per
/// DATA frame they read: far below these.
#[derive(Debug)]
struct Budgets {
    ping: Bucket,
    settings: Bucket,
    window_update: Bucket,
    priority: Bucket,
    empty: Bucket,
    unknown: Bucket,
    /// Spent by each request the h2 layer resets as malformed.
    malformed: Bucket,
}

impl Budgets {
    fn new() -> Budgets {
        Budgets {
            ping: Bucket::new(100.0, 10.0),
            settings: Bucket::new(100.0, 10.0),
            window_update: Bucket::new(1000.0, 100.0),
            priority: Bucket::new(1000.0, 100.0),
            empty: Bucket::new(100.0, 10.0),
            unknown: Bucket::new(100.0, 10.0),
            malformed: Bucket::new(100.0, 10.0),
        }
    }
}

/// Per connection: what the client sent and what was sent to it, and the verdict.
pub struct Meter {
    inbound: RefCell<(Scanner, Budgets, Instant, u32, bool)>,
    outbound: RefCell<Scanner>,
    tripped: Cell<Option<Abuse>>,
    /// Streams the h2 layer reset as malformed, not yet recorded.
    malformed: Cell<u32>,
    /// Bytes read from and written to the client (HTTP/2 frames, after TLS).
    bytes: Cell<(u64, u64)>,
    /// Since when bytes for the client have waited with no progress (it does not read).
    stalled: Cell<Option<Instant>>,
    /// The type of the last frame read.
    last_kind: Cell<u8>,
    waker: Cell<Option<Waker>>,
}

impl Default for Meter {
    fn default() -> Self {
        Meter::new()
    }
}

impl Meter {
    pub fn new() -> Meter {
        Meter {
            inbound: RefCell::new((Scanner::client(), Budgets::new(), Instant::now(), 0, false)),
            outbound: RefCell::new(Scanner::server()),
            tripped: Cell::new(None),
            malformed: Cell::new(0),
            bytes: Cell::new((0, 0)),
            stalled: Cell::new(None),
            last_kind: Cell::new(u8::MAX),
            waker: Cell::new(None),
        }
    }

    /// The abuse found, if any (then the connection must be closed).
    pub fn tripped(&self) -> Option<Abuse> {
        self.tripped.get()
    }

    /// What the h2 layer's own ENHANCE_YOUR_CALM answered, from the frames it had just read:
    /// a header block still open is a CONTINUATION flood, small DATA frames an empty-frame
    /// flood, HEADERS its limit on streams it reset itself (malformed requests), anything
    /// else its limit on streams the client reset.
    pub fn calm_cause(&self) -> Abuse {
        if self.inbound.borrow().4 {
            Abuse::Continuation
        } else {
            match self.last_kind.get() {
                DATA => Abuse::EmptyFrames,
                HEADERS => Abuse::MalformedFlood,
                _ => Abuse::RapidReset,
            }
        }
    }

    /// Ready once an abuse is found.
    pub fn poll_tripped(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Abuse> {
        match self.tripped.get() {
            Some(a) => std::task::Poll::Ready(a),
            None => {
                self.waker.set(Some(cx.waker().clone()));
                std::task::Poll::Pending
            }
        }
    }

    /// Writing to the client: waiting (`false`) or moving (`true`).
    pub fn writing(&self, progress: bool) {
        if progress {
            self.stalled.set(None);
        } else if self.stalled.get().is_none() {
            self.stalled.set(Some(Instant::now()));
        }
    }

    /// How long bytes for the client have waited without progress.
    pub fn stalled_for(&self) -> Option<std::time::Duration> {
        self.stalled.get().map(|t| t.elapsed())
    }

    /// (read from, written to) the client so far.
    pub fn bytes(&self) -> (u64, u64) {
        self.bytes.get()
    }

    /// Bytes read from the client.
    pub fn received(&self, data: &[u8]) {
        let (i, o) = self.bytes.get();
        self.bytes.set((i + data.len() as u64, o));
        if self.tripped.get().is_some() || data.is_empty() {
            return;
        }
        let mut guard = self.inbound.borrow_mut();
        let (scanner, b, last, continuations, open_block) = &mut *guard;
        let now = Instant::now();
        let secs = now.duration_since(*last).as_secs_f64();
        *last = now;
        for bucket in [
            &mut b.ping,
            &mut b.settings,
            &mut b.window_update,
            &mut b.priority,
            &mut b.empty,
            &mut b.unknown,
            &mut b.malformed,
        ] {
            bucket.refill(secs);
        }
        let mut found = None;
        let mut last = self.last_kind.get();
        scanner.scan(data, |f| {
            last = f.kind;
            if found.is_some() {
                return;
            }
            let ok = match f.kind {
                HEADERS => {
                    // a stream's work earns some room for the frames that go with it
                    b.window_update.earn(4.0);
                    b.priority.earn(4.0);
                    b.empty.earn(1.0);
                    *continuations = 0;
                    *open_block = f.flags & END_HEADERS == 0;
                    true
                }
                CONTINUATION => {
                    *continuations += 1;
                    if f.flags & END_HEADERS != 0 {
                        *open_block = false;
                    }
                    if *continuations > MAX_CONTINUATIONS {
                        found = Some(Abuse::Continuation);
                    }
                    f.len > 0 || f.flags & END_HEADERS != 0 || b.empty.spend()
                }
                DATA => f.len > 0 || f.flags & END_STREAM != 0 || b.empty.spend(),
                // ACKs too: this side sends no PING and a SETTINGS or two, so a stream of
                // ACKs answers nothing
                PING => b.ping.spend(),
                SETTINGS => b.settings.spend(),
                WINDOW_UPDATE => b.window_update.spend(),
                PRIORITY => b.priority.spend(),
                k if k > LAST_KNOWN => b.unknown.spend(),
                _ => true,
            };
            if !ok && found.is_none() {
                found = Some(match f.kind {
                    PING => Abuse::Ping,
                    SETTINGS => Abuse::Settings,
                    WINDOW_UPDATE => Abuse::WindowUpdate,
                    PRIORITY => Abuse::Priority,
                    k if k > LAST_KNOWN => Abuse::UnknownFrames,
                    _ => Abuse::EmptyFrames,
                });
            }
        });
        self.last_kind.set(last);
        if let Some(a) = found {
            self.trip(a);
        }
    }

    /// Bytes written to the client: each DATA frame sent explains a WINDOW_UPDATE or two;
    /// a stream reset with PROTOCOL_ERROR is a malformed request the h2 layer refused.
    pub fn sent(&self, data: &[u8]) {
        let (i, o) = self.bytes.get();
        self.bytes.set((i, o + data.len() as u64));
        let mut frames = 0u32;
        let mut malformed = 0u32;
        self.outbound.borrow_mut().scan(data, |f| {
            if f.kind == DATA && f.len > 0 {
                frames += 1;
            }
            if f.kind == RST_STREAM && f.first4 == PROTOCOL_ERROR {
                malformed += 1;
            }
        });
        if malformed > 0 {
            self.malformed.set(self.malformed.get() + malformed);
            let mut within = true;
            {
                let b = &mut self.inbound.borrow_mut().1;
                for _ in 0..malformed {
                    within &= b.malformed.spend();
                }
            }
            if !within {
                self.trip(Abuse::MalformedFlood);
            }
        }
        if frames > 0 {
            self.inbound
                .borrow_mut()
                .1
                .window_update
                .earn(2.0 * frames as f64);
        }
    }

    /// Malformed requests refused since the last call.
    pub fn take_malformed(&self) -> u32 {
        self.malformed.replace(0)
    }

    /// Record an abuse found elsewhere (resets, the h2 layer's own errors).
    pub fn trip(&self, a: Abuse) {
        if self.tripped.get().is_none() {
            self.tripped.set(Some(a));
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let n = payload.len() as u32;
        let mut v = n.to_be_bytes()[1..].to_vec();
        v.extend_from_slice(&[kind, flags, 0, 0, 0, 1]);
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn frames_are_found_across_any_split() {
        let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        stream.extend(frame(SETTINGS, 0, &[0; 6]));
        stream.extend(frame(HEADERS, END_HEADERS, &[1; 40]));
        stream.extend(frame(DATA, END_STREAM, &[2; 70000 % 16384]));
        stream.extend(frame(PING, 0, &[0; 8]));
        for step in [1, 2, 5, 9, 10, 23, 24, 100, stream.len()] {
            let mut s = Scanner::client();
            let mut seen = Vec::new();
            for chunk in stream.chunks(step) {
                s.scan(chunk, |f| seen.push(f.kind));
            }
            assert_eq!(seen, [SETTINGS, HEADERS, DATA, PING], "step {step}");
        }
        // a reset's error code is read whatever the split
        let mut rst = frame(RST_STREAM, 0, &[0, 0, 0, 1]);
        rst.extend(frame(RST_STREAM, 0, &[0, 0, 0, 8]));
        for step in [1, 3, 9, 10, 12, rst.len()] {
            let mut s = Scanner::server();
            let mut codes = Vec::new();
            for chunk in rst.chunks(step) {
                s.scan(chunk, |f| codes.push(f.first4));
            }
            assert_eq!(codes, [1, 8], "step {step}");
        }
    }

    fn flood(kind: u8, flags: u8, payload: &[u8], n: usize) -> Option<Abuse> {
        let m = Meter::new();
        m.received(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let f = frame(kind, flags, payload);
        let all: Vec<u8> = f.iter().copied().cycle().take(f.len() * n).collect();
        m.received(&all);
        m.tripped()
    }

    #[test]
    fn each_flood_is_named() {
        assert_eq!(flood(PING, 0, &[0; 8], 90), None);
        assert_eq!(flood(PING, 0, &[0; 8], 150), Some(Abuse::Ping));
        // unsolicited ACKs count as well
        assert_eq!(flood(PING, 1, &[0; 8], 150), Some(Abuse::Ping));
        assert_eq!(flood(SETTINGS, 0, &[], 150), Some(Abuse::Settings));
        assert_eq!(flood(SETTINGS, 1, &[], 150), Some(Abuse::Settings));
        assert_eq!(flood(0x42, 0, &[], 90), None);
        assert_eq!(flood(0x42, 0, &[], 150), Some(Abuse::UnknownFrames));
        assert_eq!(
            flood(WINDOW_UPDATE, 0, &[0, 0, 0, 1], 1500),
            Some(Abuse::WindowUpdate)
        );
        assert_eq!(flood(PRIORITY, 0, &[0; 5], 1500), Some(Abuse::Priority));
        assert_eq!(flood(DATA, 0, &[], 150), Some(Abuse::EmptyFrames));
        assert_eq!(flood(DATA, END_STREAM, &[], 150), None);
        assert_eq!(flood(DATA, 0, &[1], 10_000), None);
        assert_eq!(flood(CONTINUATION, 0, &[1], 100), Some(Abuse::Continuation));
    }

    #[test]
    fn data_sent_explains_window_updates() {
        let m = Meter::new();
        m.received(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let out: Vec<u8> = (0..2000).flat_map(|_| frame(DATA, 0, &[7; 100])).collect();
        m.sent(&out);
        let wu: Vec<u8> = (0..4000)
            .flat_map(|_| frame(WINDOW_UPDATE, 0, &[0, 0, 0, 100]))
            .collect();
        m.received(&wu);
        assert_eq!(m.tripped(), None);
    }
}
