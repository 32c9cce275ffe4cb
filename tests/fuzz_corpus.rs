//! Every input in the fuzz seed corpus (tests/fuzz/corpus, where crashes found by the fuzzers
//! are kept as regression inputs) goes through the parsers it was found against: no panic.

use edgeshard::config::{Config, HeadLimits};
use edgeshard::http::chunked::ChunkedDecoder;
use edgeshard::http::parse::{parse_request, parse_response, Method};
use std::path::Path;

fn inputs(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target);
    let mut v: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no seeds in {}", dir.display());
    v
}

#[test]
fn corpus_inputs_never_panic() {
    for data in inputs("request_head") {
        let mut h = [httparse::EMPTY_HEADER; 100];
        let _ = parse_request(&data, &mut h, &HeadLimits::default());
    }
    for data in inputs("response_head") {
        let mut h = [httparse::EMPTY_HEADER; 100];
        let _ = parse_response(&data, &mut h, Method::Get, 16384);
    }
    for data in inputs("chunked") {
        let mut d = ChunkedDecoder::new();
        let _ = d.advance(&data);
    }
    for data in inputs("client_hello") {
        let _ = edgeshard::sni::parse(&data);
    }
    for data in inputs("proxy_header") {
        let _ = edgeshard::proxyproto::parse(&data);
    }
    for data in inputs("config") {
        if let Ok(text) = std::str::from_utf8(&data) {
            let _ = Config::parse(Path::new("/nonexistent/fuzz.toml"), text);
        }
    }
}
