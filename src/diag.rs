//! Diagnostics (tracing output) without ever blocking a shard on stderr. Each event is
//! formatted into its own buffer and handed to one writer thread through a bounded channel
//! with `try_send`; when stderr's reader stalls (a paused terminal, a slow journald, a full
//! pipe) lines are dropped and counted (`edgeshard_log_records_dropped_total{log="stderr"}`),
//! and no thread but the writer ever touches stderr or its lock.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lines in flight to the writer thread: a burst's worth (rate limiting keeps the steady
/// flow far below what a working stderr takes).
const CHANNEL_LINES: usize = 512;
/// How often the idle writer looks for lines (it polls: a receiver blocked in `recv` would
/// make every sender take the channel's wake-up lock).
const POLL: Duration = Duration::from_millis(5);

static TX: OnceLock<SyncSender<Vec<u8>>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);
static SENT: AtomicU64 = AtomicU64::new(0);
/// Lines the writer has finished with (written or failed).
static HANDLED: AtomicU64 = AtomicU64::new(0);

/// Lines dropped because stderr could not take them.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Install the tracing subscriber (level from RUST_LOG, default info) writing through the
/// writer thread.
pub fn init() {
    let (tx, rx) = sync_channel(CHANNEL_LINES);
    if TX.set(tx).is_err() {
        return;
    }
    install_panic_hook();
    let _ = std::thread::Builder::new()
        .name("stderr-writer".into())
        .spawn(move || writer(rx));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(|| Line(Vec::new()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Hand one finished line (newline included) to the writer, without waiting: for messages
/// outside tracing (start-up errors), which must not block on a stalled stderr either.
pub fn line(text: String) {
    drop(Line(text.into_bytes()));
}

/// Panic messages go through the writer too: Rust's default hook writes to fd 2 from the
/// panicking thread, so with stderr stalled a panicking shard would block there forever
/// (and never reach the supervisor's exit).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        line(format!(
            "panic in thread {}: {info}\n",
            thread.name().unwrap_or("unnamed")
        ));
    }));
}

/// Wait (at most `limit`) for the lines already sent to reach stderr: at exit, so the last
/// words are not lost when stderr is fine, and exit is not held up when it is stalled.
pub fn flush(limit: Duration) {
    let deadline = Instant::now() + limit;
    while HANDLED.load(Ordering::Relaxed) < SENT.load(Ordering::Relaxed)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One event's formatted text, sent when tracing drops the writer.
struct Line(Vec<u8>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let Some(tx) = TX.get() else { return };
        match tx.try_send(std::mem::take(&mut self.0)) {
            Ok(()) => {
                SENT.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn writer(rx: Receiver<Vec<u8>>) {
    let stderr = std::io::stderr();
    loop {
        match rx.try_recv() {
            Ok(line) => {
                if stderr.lock().write_all(&line).is_err() {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
                HANDLED.fetch_add(1, Ordering::Relaxed);
            }
            Err(TryRecvError::Empty) => std::thread::sleep(POLL),
            Err(TryRecvError::Disconnected) => return,
        }
    }
}

/// Per-kind rate limit of repetitive diagnostics (one per shard: no sharing, no lock). A kind
/// may log BURST lines per second; the rest are counted and reported as one line when the
/// next second's first line of that kind is logged.
#[derive(Default)]
pub struct RateLimit {
    kinds: std::cell::RefCell<Vec<KindState>>,
}

struct KindState {
    kind: &'static str,
    second: u64,
    count: u32,
    suppressed: u64,
}

/// Lines of one kind per second per shard.
pub const BURST: u32 = 5;

impl RateLimit {
    /// Should a line of `kind` be logged at `second` (a monotonic second)? Returns how many
    /// of its kind were suppressed since the last one logged, to say so.
    pub fn allow(&self, kind: &'static str, second: u64) -> Option<u64> {
        let mut kinds = self.kinds.borrow_mut();
        let i = match kinds.iter().position(|k| k.kind == kind) {
            Some(i) => i,
            None => {
                kinds.push(KindState {
                    kind,
                    second,
                    count: 0,
                    suppressed: 0,
                });
                kinds.len() - 1
            }
        };
        let k = &mut kinds[i];
        if k.second != second {
            k.second = second;
            k.count = 0;
        }
        if k.count >= BURST {
            k.suppressed += 1;
            return None;
        }
        k.count += 1;
        Some(std::mem::take(&mut k.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_per_kind_per_second_and_counts_the_rest() {
        let r = RateLimit::default();
        for _ in 0..BURST {
            assert_eq!(r.allow("a", 1), Some(0));
        }
        assert_eq!(r.allow("a", 1), None);
        assert_eq!(r.allow("a", 1), None);
        assert_eq!(r.allow("b", 1), Some(0), "kinds are apart");
        assert_eq!(
            r.allow("a", 2),
            Some(2),
            "next second reports the suppressed"
        );
        assert_eq!(r.allow("a", 2), Some(0));
    }
}
