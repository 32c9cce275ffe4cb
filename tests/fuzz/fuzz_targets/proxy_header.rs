//! The PROXY protocol header reader on arbitrary bytes: no panic; a complete header never
//! claims more bytes than it was given, and reads the same with bytes after it.
#![no_main]
use edgeshard::proxyproto::{parse, Header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Header::Complete { len, source, dest } = parse(data) {
        assert!(len <= data.len());
        assert_eq!(
            parse(&data[..len]),
            Header::Complete { len, source, dest }
        );
    }
});
