//! The chunked decoder on arbitrary bytes, whole and split at every point the input picks:
//! no panic, and both ways agree.
#![no_main]
use edgeshard::http::chunked::ChunkedDecoder;
use libfuzzer_sys::fuzz_target;

fn decode(parts: &[&[u8]]) -> Result<(Vec<u8>, bool), ()> {
    let mut d = ChunkedDecoder::new();
    let mut out = Vec::new();
    for part in parts {
        let mut off = 0;
        while off < part.len() {
            let s = d.step(&part[off..]).map_err(|_| ())?;
            if let Some((o, l)) = s.data {
                out.extend_from_slice(&part[off + o..off + o + l]);
            }
            off += s.consumed;
            if s.done {
                return Ok((out, true));
            }
            if s.consumed == 0 {
                break;
            }
        }
    }
    Ok((out, d.is_done()))
}

fuzz_target!(|data: &[u8]| {
    let whole = decode(&[data]);
    let split = data.first().map(|&b| b as usize % (data.len() + 1)).unwrap_or(0);
    let parts = decode(&[&data[..split], &data[split..]]);
    if let (Ok((a, true)), Ok((b, true))) = (&whole, &parts) {
        assert_eq!(a, b);
    }
});
