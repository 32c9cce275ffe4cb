//! Process-level concerns around the shards: locked-memory limits glommio needs, and
//! synchronous signal handling on the main thread (no handler runs on a shard), and the
//! supervision of every shard's long-lived tasks.

use crate::config::Config;
use std::time::Duration;

/// glommio refuses to start an executor below this RLIMIT_MEMLOCK.
const MIN_MEMLOCK: u64 = 512 * 1024;

/// Refuse to start with a locked-memory limit glommio cannot work under, saying what to raise;
/// warn when io_memory cannot be registered for every shard (it then runs unregistered).
pub fn check_memlock(config: &Config) -> Result<(), String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return Ok(());
    }
    let cur = lim.rlim_cur;
    if cur == libc::RLIM_INFINITY {
        return Ok(());
    }
    let io_total: u64 = config
        .runtime
        .shards
        .iter()
        .map(|s| s.io_memory as u64)
        .sum();
    if cur < MIN_MEMLOCK {
        return Err(format!(
            "the locked-memory limit (RLIMIT_MEMLOCK) is {} KiB; io_uring needs at least {} KiB. \
             Raise it: `ulimit -l {}` in this shell, LimitMEMLOCK={}K in the systemd unit, \
             or a memlock line in /etc/security/limits.conf (see tuning/).",
            cur / 1024,
            MIN_MEMLOCK / 1024,
            (io_total + MIN_MEMLOCK) / 1024,
            (io_total + MIN_MEMLOCK) / 1024,
        ));
    }
    let want = io_total;
    if cur < want {
        tracing::warn!(
            limit_kib = cur / 1024,
            wanted_kib = want / 1024,
            "locked-memory limit below shards x io_memory: io buffers run unregistered (slower). Raise `ulimit -l` or lower runtime.io_memory"
        );
    }
    Ok(())
}

/// Raise the open-files soft limit to the hard limit: every client and upstream connection is
/// a descriptor, and the default 1024 is far below what one shard holds. Returns the limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

/// The signals that stop the proxy, blocked in the calling thread (and all threads it
/// spawns afterwards).
pub fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        // Operators and tools send SIGHUP to "reload": it must never kill the appliance.
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// End the process now with `code`, without the C library's exit handlers: the allocator's
/// (mimalloc's) clean-up at exit walks its heaps while other threads (log writers, the
/// blocking pool) may still free into them, and crashed the process at exit about once in
/// fifty stops (SIGSEGV instead of 0). Everything worth keeping is flushed before.
pub fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // SAFETY: _exit ends the process; nothing after it runs.
    unsafe { libc::_exit(code) }
}

/// What a signal asks the process to do.
pub enum Signal {
    /// SIGTERM or SIGINT: drain and exit.
    Stop(&'static str),
    /// SIGUSR1: reopen the log files.
    ReopenLogs,
    /// SIGHUP: read the configuration again.
    Reload,
    /// SIGUSR2: start the binary again and hand over to it.
    Upgrade,
}

/// Block until one of the blocked signals arrives.
pub fn wait_signal(set: &libc::sigset_t) -> Signal {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: sigwait on a set of blocked signals.
        if unsafe { libc::sigwait(set, &mut sig) } != 0 {
            continue;
        }
        return match sig {
            libc::SIGTERM => Signal::Stop("SIGTERM"),
            libc::SIGINT => Signal::Stop("SIGINT"),
            libc::SIGUSR1 => Signal::ReopenLogs,
            libc::SIGHUP => Signal::Reload,
            libc::SIGUSR2 => Signal::Upgrade,
            _ => continue,
        };
    }
}

/// Run one of a shard's long-lived tasks (accept loops, the parking lot, health checks, the
/// mesh, the admin listener, the log flusher). Such a task dying would leave a shard that
/// looks alive but no longer accepts, checks or answers: a panic in one ends the process
/// (exit 70) so that the service manager restarts the appliance whole, never running on with
/// a dead part. `EDGESHARD_FAILPOINT=<task>` panics that task at start (tests only).
pub fn supervise(
    shard: usize,
    task: &'static str,
    fut: impl std::future::Future<Output = ()> + 'static,
) {
    let fail = std::env::var_os("EDGESHARD_FAILPOINT").is_some_and(|v| v == task);
    glommio::spawn_local(async move {
        use futures_lite::FutureExt;
        let run = async move {
            if fail {
                panic!("failpoint {task}");
            }
            fut.await
        };
        if std::panic::AssertUnwindSafe(run)
            .catch_unwind()
            .await
            .is_err()
        {
            tracing::error!(
                shard,
                task,
                "shard task panicked (bug): exiting so that the service manager restarts edgeshard"
            );
            crate::diag::flush(Duration::from_secs(1));
            exit_now(70);
        }
    })
    .detach();
}
