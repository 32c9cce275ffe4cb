//! The request head parser and the head writer on arbitrary bytes: no panic, and whatever is
//! accepted has one unambiguous framing.
#![no_main]
use edgeshard::config::HeadLimits;
use edgeshard::http::parse::parse_request;
use edgeshard::http::write::{write_request_head, Forwarded};
use edgeshard::http::BodyKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut h = [httparse::EMPTY_HEADER; 100];
    if let Ok(Some(req)) = parse_request(data, &mut h, &HeadLimits::default()) {
        let head = &data[..req.info.head_len];
        assert!(!head.contains(&0));
        let lower = String::from_utf8_lossy(head).to_ascii_lowercase();
        let cl = lower.matches("\r\ncontent-length:").count();
        let te = lower.matches("\r\ntransfer-encoding:").count();
        assert!(cl <= 1 && !(cl == 1 && te > 0));
        if te > 0 {
            assert_eq!(req.info.body, BodyKind::Chunked);
        }
        let mut out = Vec::new();
        let fwd = Forwarded {
            client_ip: "192.0.2.1".parse().unwrap(),
            proto: "http",
            trusted: false,
            rfc7239: true,
        };
        write_request_head(&req, &fwd, "rs.example:80", req.info.expect_continue, None, None, &mut out);
        assert!(out.ends_with(b"\r\n\r\n"));
    }
});
