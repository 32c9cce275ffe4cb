//! The response head parser on arbitrary bytes: no panic, no ambiguous framing accepted.
#![no_main]
use edgeshard::http::parse::{parse_response, Method};
use edgeshard::http::BodyKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for method in [Method::Get, Method::Head] {
        let mut h = [httparse::EMPTY_HEADER; 100];
        if let Ok(Some(r)) = parse_response(data, &mut h, method, 16384) {
            let lower = String::from_utf8_lossy(&data[..r.info.head_len]).to_ascii_lowercase();
            let cl = lower.matches("\r\ncontent-length:").count();
            let te = lower.matches("\r\ntransfer-encoding:").count();
            assert!(cl <= 1 && !(cl == 1 && te > 0));
            if method == Method::Head {
                assert_eq!(r.info.body, BodyKind::None);
            }
        }
    }
});
