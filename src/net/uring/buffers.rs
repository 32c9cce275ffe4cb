//! The ring of provided receive buffers an io_uring engine's multishot receives fill: one
//! anonymous mapping of `count` buffers, and the entries that hand them to the kernel.

use super::BUF_SIZE;
use io_uring::types;
use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

/// A received segment: `len` bytes at `off` of buffer `bid`.
pub(super) struct Chunk {
    pub(super) bid: u16,
    pub(super) off: u32,
    pub(super) len: u32,
}

/// The provided-buffer ring: the entries the kernel takes buffers from, and the buffers.
pub(super) struct Buffers {
    pub(super) ring: *mut types::BufRingEntry,
    ring_len: usize,
    mem: *mut u8,
    mem_len: usize,
    tail: Cell<u16>,
    /// Entries and buffers (a power of two).
    pub(super) count: u16,
    /// Buffers the kernel may take (put back and not yet used by a receive).
    pub(super) free: Cell<u32>,
}

impl Buffers {
    pub(super) fn new(count: u16) -> io::Result<Buffers> {
        let ring_len = count as usize * std::mem::size_of::<types::BufRingEntry>();
        let mem_len = count as usize * BUF_SIZE;
        let ring = mmap(ring_len)? as *mut types::BufRingEntry;
        let mem = match mmap(mem_len) {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: unmapping what was just mapped, of its length.
                unsafe { libc::munmap(ring as *mut libc::c_void, ring_len) };
                return Err(e);
            }
        };
        let b = Buffers {
            ring,
            ring_len,
            mem,
            mem_len,
            tail: Cell::new(0),
            count,
            free: Cell::new(0),
        };
        for bid in 0..count {
            b.put(bid);
        }
        b.publish();
        Ok(b)
    }

    /// Queue buffer `bid` for the kernel (visible after `publish`).
    pub(super) fn put(&self, bid: u16) {
        let t = self.tail.get();
        // SAFETY: the index is masked into the ring, which has `count` entries.
        let e = unsafe { &mut *self.ring.add((t & (self.count - 1)) as usize) };
        // SAFETY: bid < count, so the buffer lies inside `mem`.
        e.set_addr(unsafe { self.mem.add(bid as usize * BUF_SIZE) } as u64);
        e.set_len(BUF_SIZE as u32);
        e.set_bid(bid);
        self.tail.set(t.wrapping_add(1));
        self.free.set(self.free.get() + 1);
    }

    pub(super) fn publish(&self) {
        // SAFETY: the ring's first entry overlays the shared tail (io_uring_buf_ring).
        let tail = unsafe { &*(types::BufRingEntry::tail(self.ring) as *const AtomicU16) };
        tail.store(self.tail.get(), Ordering::Release);
    }

    pub(super) fn bytes(&self, c: &Chunk) -> &[u8] {
        // SAFETY: the kernel wrote `len` bytes at `off` of buffer `bid`, which is ours until
        // it is put back.
        unsafe {
            std::slice::from_raw_parts(
                self.mem.add(c.bid as usize * BUF_SIZE + c.off as usize),
                c.len as usize,
            )
        }
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mappings, of their lengths (the ring is gone by now).
        unsafe {
            libc::munmap(self.ring as *mut libc::c_void, self.ring_len);
            libc::munmap(self.mem as *mut libc::c_void, self.mem_len);
        }
    }
}

fn mmap(len: usize) -> io::Result<*mut u8> {
    // SAFETY: an anonymous private mapping; checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p as *mut u8)
}
