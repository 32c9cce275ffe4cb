//! HTTP/1.1 on the wire: strict head parsing (`parse`), head rewriting (`write`), chunked
//! framing (`chunked`), canned error responses (`canned`) and the per-connection read buffer.
//! Pure code: no sockets, no clocks.

pub mod canned;
pub mod chunked;
pub mod parse;
pub mod rules;
pub mod write;

pub use parse::{BodyKind, Method, RequestInfo, ResponseInfo};

/// A fixed-size read buffer reused for the life of a connection: bytes live in
/// `data[start..end]`; reads land in `spare()`.
pub struct Buf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buf {
    pub fn new(capacity: usize) -> Buf {
        Buf {
            data: vec![0u8; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    pub fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn capacity(&self) -> usize {
        self.data.len()
    }

    /// Drop `n` bytes from the front.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n.min(self.len());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Free space to read into; moves unread bytes to the front when the tail is full.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.end == self.data.len() && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.data[self.end..]
    }

    /// Record `n` bytes read into `spare()`.
    pub fn advance(&mut self, n: usize) {
        self.end = (self.end + n).min(self.data.len());
    }

    pub fn is_full(&self) -> bool {
        self.start == 0 && self.end == self.data.len()
    }

    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// A buffer with no storage (no allocation): an idle connection holds one of these.
    pub fn detached() -> Buf {
        Buf {
            data: Box::default(),
            start: 0,
            end: 0,
        }
    }

    pub fn is_detached(&self) -> bool {
        self.data.is_empty()
    }

    /// Give up the storage of an empty buffer (to a pool), leaving it detached.
    pub fn detach(&mut self) -> Option<Box<[u8]>> {
        if !self.is_empty() || self.is_detached() {
            return None;
        }
        Some(std::mem::take(&mut self.data))
    }

    /// Give a detached buffer storage again.
    pub fn attach(&mut self, storage: Box<[u8]>) {
        self.data = storage;
        self.start = 0;
        self.end = 0;
    }

    /// Move the buffered bytes into `storage` and return the old storage; refused (and
    /// `storage` handed back) when they do not fit.
    pub fn exchange(&mut self, mut storage: Box<[u8]>) -> Result<Box<[u8]>, Box<[u8]>> {
        let n = self.len();
        if n > storage.len() {
            return Err(storage);
        }
        storage[..n].copy_from_slice(self.filled());
        self.start = 0;
        self.end = n;
        Ok(std::mem::replace(&mut self.data, storage))
    }
}

#[cfg(test)]
mod tests {
    use super::Buf;

    #[test]
    fn buf_compacts_when_tail_is_full() {
        let mut b = Buf::new(8);
        b.spare()[..8].copy_from_slice(b"abcdefgh");
        b.advance(8);
        assert!(b.is_full());
        b.consume(5);
        assert_eq!(b.filled(), b"fgh");
        assert_eq!(b.spare().len(), 5);
        assert_eq!(b.filled(), b"fgh");
        b.consume(3);
        assert!(b.is_empty());
        assert_eq!(b.spare().len(), 8);
    }

    #[test]
    fn exchange_keeps_the_buffered_bytes_or_refuses() {
        let mut b = Buf::new(8);
        b.spare()[..6].copy_from_slice(b"abcdef");
        b.advance(6);
        b.consume(2);
        let old = b.exchange(vec![0u8; 32].into_boxed_slice()).unwrap();
        assert_eq!(old.len(), 8);
        assert_eq!(b.filled(), b"cdef");
        assert_eq!(b.capacity(), 32);
        let small = b.exchange(vec![0u8; 2].into_boxed_slice()).unwrap_err();
        assert_eq!(small.len(), 2);
        assert_eq!(b.filled(), b"cdef");
    }
}
