//! The pass-through ClientHello reader on arbitrary bytes: no panic, and a verdict on a
//! prefix never contradicts the whole (a complete hello stays complete with more bytes).
#![no_main]
use edgeshard::sni::{parse, Hello};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    let cut = data.first().map(|&b| b as usize % (data.len() + 1)).unwrap_or(0);
    if let Hello::Complete { sni } = parse(&data[..cut]) {
        assert_eq!(whole, Hello::Complete { sni });
    }
});
