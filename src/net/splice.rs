//! Zero-copy body relaying between two plain sockets: socket → pipe → socket with splice(2),
//! so a large body's bytes never cross into user space. Each shard keeps a few pipes for it.

use super::{cvt, Socket};
use crate::relay::RelayError;
use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// What a pipe holds (the kernel rounds to pages; 64 KiB when it refuses more).
const PIPE_SIZE: i32 = 1024 * 1024;
/// Pipes a shard keeps for the next large body.
const POOL: usize = 16;

/// A pipe's two ends; empty whenever it is in the pool.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills two fds we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created and are owned from here on.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on our own pipe; a refusal (a user's pipe quota) keeps the default.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(Pipe { read, write })
    }

    /// One from the shard's pool, or a new one.
    pub fn take() -> io::Result<Pipe> {
        match PIPES.with(|p| p.borrow_mut().pop()) {
            Some(p) => Ok(p),
            None => Pipe::new(),
        }
    }

    /// Back to the pool: only ever an empty pipe (one that failed midway is dropped).
    fn give(self) {
        PIPES.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL {
                p.push(self);
            }
        });
    }
}

fn splice(from: i32, to: i32, len: usize) -> io::Result<usize> {
    // SAFETY: splice between two fds we hold open, no offsets; never blocks.
    cvt(unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    })
}

/// Move exactly `len` bytes from `src` to `dst` through `pipe`, waiting at most
/// `read_timeout` for the sender's next bytes and `write_timeout` for the receiver (each
/// wait). `moved` counts what reached `dst` as it goes. The pipe goes back to the shard's
/// pool when the body is through.
pub async fn relay(
    src: &Socket,
    dst: &Socket,
    pipe: Pipe,
    len: u64,
    read_timeout: Duration,
    write_timeout: Duration,
    moved: &mut u64,
) -> Result<u64, RelayError> {
    let (s, d) = (src, dst);
    let mut left = len;
    while left > 0 {
        let chunk = left.min(PIPE_SIZE as u64) as usize;
        // in: as much as the socket has, up to what the pipe holds. `want` 0: a short splice
        // may mean a full pipe, not a drained socket, so only EAGAIN clears readiness.
        let n = crate::io::timeout(
            read_timeout,
            poll_fn(|cx| s.poll_read_raw(cx, 0, |fd| splice(fd, pipe.write.as_raw_fd(), chunk))),
        )
        .await
        .map_err(RelayError::Source)?;
        if n == 0 {
            return Err(RelayError::Source(io::ErrorKind::UnexpectedEof.into()));
        }
        // out: all of it before reading more
        let mut held = n;
        while held > 0 {
            let m = crate::io::timeout(
                write_timeout,
                poll_fn(|cx| d.poll_write_raw(cx, |fd| splice(pipe.read.as_raw_fd(), fd, held))),
            )
            .await
            .map_err(RelayError::Sink)?;
            if m == 0 {
                return Err(RelayError::Sink(io::ErrorKind::WriteZero.into()));
            }
            held -= m;
            *moved += m as u64;
        }
        left -= n as u64;
    }
    pipe.give();
    Ok(len)
}
