//! Strict chunked transfer-coding decoder (RFC 9112 §7.1), as an incremental state machine
//! over borrowed bytes. The proxy forwards the chunked bytes it validated as they are
//! (`advance`), or takes only the data out (`step`) for HTTP/1.0 peers.

/// Most hex digits in a chunk size: 16 fit a u64.
const MAX_SIZE_DIGITS: u8 = 16;
/// Longest chunk extension or trailer section we accept.
const MAX_EXT_BYTES: usize = 4096;
const MAX_TRAILER_BYTES: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    BadSize,
    SizeTooLong,
    BadExtension,
    BadLineEnding,
    BadTrailer,
    TrailerTooLarge,
}

impl ChunkError {
    pub fn reason(self) -> &'static str {
        match self {
            ChunkError::BadSize => "malformed chunk size",
            ChunkError::SizeTooLong => "chunk size has too many digits",
            ChunkError::BadExtension => "malformed chunk extension",
            ChunkError::BadLineEnding => "bare CR or LF in chunked framing",
            ChunkError::BadTrailer => "malformed trailer field",
            ChunkError::TrailerTooLarge => "trailer section too large",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size { digits: u8, value: u64 },
    Ext,
    SizeLf { value: u64 },
    Data { remaining: u64 },
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    /// Size of the chunk whose extension is being read.
    pending_size: u64,
    ext_bytes: usize,
    trailer_bytes: usize,
    trailer_has_colon: bool,
}

/// What one `step` did: `consumed` input bytes, of which `data` (offset, len) is chunk data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub consumed: usize,
    pub data: Option<(usize, usize)>,
    pub done: bool,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

fn is_ext_byte(b: u8) -> bool {
    b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size {
                digits: 0,
                value: 0,
            },
            pending_size: 0,
            ext_bytes: 0,
            trailer_bytes: 0,
            trailer_has_colon: false,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consume framing bytes until the next run of chunk data (returned in `data`), the end
    /// of the input, or the end of the message.
    pub fn step(&mut self, input: &[u8]) -> Result<Step, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Size { digits, value } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if digits == MAX_SIZE_DIGITS {
                            return Err(ChunkError::SizeTooLong);
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        let value = value.checked_mul(16).ok_or(ChunkError::SizeTooLong)? + d;
                        self.state = State::Size {
                            digits: digits + 1,
                            value,
                        };
                    }
                    b';' if digits > 0 => {
                        self.ext_bytes = 0;
                        self.pending_size = value;
                        self.state = State::Ext;
                    }
                    b'\r' if digits > 0 => self.state = State::SizeLf { value },
                    b'\n' => return Err(ChunkError::BadLineEnding),
                    _ => return Err(ChunkError::BadSize),
                },
                State::Ext => match b {
                    b'\r' => {
                        self.state = State::SizeLf {
                            value: self.pending_size,
                        }
                    }
                    b'\n' => return Err(ChunkError::BadLineEnding),
                    _ if is_ext_byte(b) => {
                        self.ext_bytes += 1;
                        if self.ext_bytes > MAX_EXT_BYTES {
                            return Err(ChunkError::BadExtension);
                        }
                    }
                    _ => return Err(ChunkError::BadExtension),
                },
                State::SizeLf { value } => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnding);
                    }
                    self.state = if value == 0 {
                        self.trailer_bytes = 0;
                        State::TrailerStart
                    } else {
                        State::Data { remaining: value }
                    };
                }
                State::Data { remaining } => {
                    let avail = (input.len() - i) as u64;
                    let take = avail.min(remaining) as usize;
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data { remaining: left }
                    };
                    let start = i;
                    i += take;
                    return Ok(Step {
                        consumed: i,
                        data: Some((start, take)),
                        done: false,
                    });
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::BadLineEnding);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnding);
                    }
                    self.state = State::Size {
                        digits: 0,
                        value: 0,
                    };
                }
                State::TrailerStart => {
                    self.bump_trailer()?;
                    match b {
                        b'\r' => self.state = State::EndLf,
                        b'\n' => return Err(ChunkError::BadLineEnding),
                        // obs-fold and whitespace before a field name are refused
                        b' ' | b'\t' | b':' => return Err(ChunkError::BadTrailer),
                        _ if is_ext_byte(b) => {
                            self.trailer_has_colon = false;
                            self.state = State::TrailerLine;
                        }
                        _ => return Err(ChunkError::BadTrailer),
                    }
                }
                State::TrailerLine => {
                    self.bump_trailer()?;
                    match b {
                        b'\r' if self.trailer_has_colon => self.state = State::TrailerLf,
                        b'\r' | b'\n' => return Err(ChunkError::BadTrailer),
                        b':' => self.trailer_has_colon = true,
                        _ if is_ext_byte(b) => {}
                        _ => return Err(ChunkError::BadTrailer),
                    }
                }
                State::TrailerLf => {
                    self.bump_trailer()?;
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnding);
                    }
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnding);
                    }
                    self.state = State::Done;
                    return Ok(Step {
                        consumed: i + 1,
                        data: None,
                        done: true,
                    });
                }
                State::Done => {
                    return Ok(Step {
                        consumed: i,
                        data: None,
                        done: true,
                    })
                }
            }
            i += 1;
        }
        Ok(Step {
            consumed: i,
            data: None,
            done: self.state == State::Done,
        })
    }

    /// Validate as much of `input` as belongs to the message; returns (bytes of the message,
    /// message complete). Used to forward chunked bodies unchanged.
    pub fn advance(&mut self, input: &[u8]) -> Result<(usize, bool), ChunkError> {
        let mut off = 0;
        loop {
            let s = self.step(&input[off..])?;
            off += s.consumed;
            if s.done || off == input.len() {
                return Ok((off, s.done));
            }
        }
    }

    fn bump_trailer(&mut self) -> Result<(), ChunkError> {
        self.trailer_bytes += 1;
        if self.trailer_bytes > MAX_TRAILER_BYTES {
            return Err(ChunkError::TrailerTooLarge);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, usize, bool), ChunkError> {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let mut off = 0;
        loop {
            let s = d.step(&input[off..])?;
            if let Some((o, l)) = s.data {
                out.extend_from_slice(&input[off + o..off + o + l]);
            }
            off += s.consumed;
            if s.done || off == input.len() {
                return Ok((out, off, s.done));
            }
        }
    }

    #[test]
    fn decodes_chunks_and_trailers() {
        let msg = b"5\r\nhello\r\n6;name=val\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let (data, used, done) = decode_all(msg).unwrap();
        assert_eq!(data, b"hello world");
        assert!(done);
        assert_eq!(&msg[used..], b"NEXT");
    }

    #[test]
    fn byte_at_a_time_equals_whole() {
        let msg = b"a\r\n0123456789\r\n1F\r\nabcdefghijklmnopqrstuvwxyz01234\r\n0\r\n\r\n";
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let mut done = false;
        for i in 0..msg.len() {
            let s = d.step(&msg[i..i + 1]).unwrap();
            assert_eq!(s.consumed, 1);
            if let Some((o, l)) = s.data {
                out.extend_from_slice(&msg[i + o..i + o + l]);
            }
            done = s.done;
        }
        assert!(done);
        assert_eq!(out.len(), 10 + 31);
    }

    #[test]
    fn advance_stops_at_message_end() {
        let msg = b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
        let mut d = ChunkedDecoder::new();
        let (n, done) = d.advance(msg).unwrap();
        assert!(done);
        assert_eq!(&msg[n..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn refuses_ambiguity() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..], // bare LF after size
            b"5\r\nhello\n0\r\n\r\n",      // bare LF after data
            b"5\r\nhelloX\r\n0\r\n\r\n",   // data longer than size
            b"-5\r\nhello\r\n0\r\n\r\n",   // sign
            b"0x5\r\nhello\r\n0\r\n\r\n",  // prefix
            b" 5\r\nhello\r\n",            // leading space
            b"5 \r\nhello\r\n",            // trailing space
            b"\r\n",                       // empty size
            b"11111111111111111\r\n",      // 17 digits
            b"5;a\x00b\r\nhello\r\n",      // NUL in extension
            b"0\r\n bad: fold\r\n\r\n",    // obs-fold in trailer
            b"0\r\nnocolon\r\n\r\n",       // trailer without colon
            b"0\r\nX: 1\n\r\n",            // bare LF in trailer
            b"0\r\n\n",                    // bare LF at end
        ] {
            assert!(
                decode_all(bad).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn max_size_digits_accepted() {
        let mut d = ChunkedDecoder::new();
        assert!(d.step(b"ffffffffffffffff\r\n").is_ok());
    }
}
