//! A failing real server costs the client a clean 502/503/504, never a hang and never another
//! connection's data; only a request that is safe to repeat is ever sent twice.

mod common;

use common::client::{get, one, Client};
use common::origin::{Next, Origin, Seen};
use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn reset(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
}

#[test]
fn refused_connection_gives_502() {
    let dead = local(free_port()); // nothing listens there
    let listen = local(free_port());
    let _p = Proxy::start(&simple_config(listen, &[dead], "", ""), listen);
    let r = one(listen, &get("/"));
    assert_eq!(r.status, 502);
}

#[test]
fn reset_or_close_before_any_response_byte_gives_502() {
    for rst in [true, false] {
        let o = Origin::start(Arc::new(move |_s: &Seen, w: &mut TcpStream| {
            if rst {
                reset(w);
            }
            Next::Close
        }));
        let listen = local(free_port());
        let _p = Proxy::start(&simple_config(listen, &[o.addr], "", ""), listen);
        let r = one(
            listen,
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
        );
        assert_eq!(r.status, 502, "rst={rst}");
        assert_eq!(o.nr_requests(), 1, "a POST is never sent twice");
    }
}

#[test]
fn malformed_responses_give_502() {
    let bad: &[&[u8]] = &[
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
        b"HTTP/1.1 999999 Nope\r\n\r\n",
    ];
    for resp in bad {
        let resp: &'static [u8] = resp;
        let o = Origin::start(Arc::new(move |_s: &Seen, w: &mut TcpStream| {
            let _ = w.write_all(resp);
            Next::Close
        }));
        let listen = local(free_port());
        let _p = Proxy::start(&simple_config(listen, &[o.addr], "", ""), listen);
        let r = one(listen, &get("/"));
        assert_eq!(r.status, 502, "for {:?}", String::from_utf8_lossy(resp));
    }
}

#[test]
fn silent_real_server_gives_504_in_time() {
    let hold = Arc::new(AtomicBool::new(true));
    let h2 = hold.clone();
    let o = Origin::start(Arc::new(move |_s: &Seen, _w: &mut TcpStream| {
        wait_until(Duration::from_secs(30), "test release", || {
            !h2.load(Ordering::SeqCst)
        });
        Next::Close
    }));
    let listen = local(free_port());
    let _p = Proxy::start(
        &simple_config(listen, &[o.addr], "response_timeout = \"400ms\"", ""),
        listen,
    );
    let started = Instant::now();
    let r = one(listen, &get("/slow"));
    assert_eq!(r.status, 504);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(5),
        "took {took:?}"
    );
    hold.store(false, Ordering::SeqCst);
}

#[test]
fn dying_mid_response_truncates_and_closes_only_that_client() {
    let o = Origin::start(Arc::new(|s: &Seen, w: &mut TcpStream| {
        if s.request_line.contains("/die") {
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial");
            let _ = w.flush();
            reset(w);
            return Next::Close;
        }
        let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfine");
        Next::KeepAlive
    }));
    let listen = local(free_port());
    let _p = Proxy::start(&simple_config(listen, &[o.addr], "", ""), listen);
    let mut other = Client::connect(listen);
    assert_eq!(other.request(&get("/ok")).body, b"fine");
    let mut c = Client::connect(listen);
    c.send(&get("/die"));
    let started = Instant::now();
    let r = c.read(false);
    assert!(r.is_err(), "a truncated body must not look complete");
    assert!(started.elapsed() < Duration::from_secs(5));
    // the other client's connection is untouched
    assert_eq!(other.request(&get("/ok")).body, b"fine");
}

#[test]
fn reused_pooled_connection_that_dies_is_retried_once_for_idempotent_requests_only() {
    // The origin answers the first request on each connection, then closes the connection
    // on the next one without answering: the race of a keep-alive timeout.
    let seen_per_conn = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        usize,
        usize,
    >::new()));
    let spc = seen_per_conn.clone();
    let o = Origin::start(Arc::new(move |s: &Seen, w: &mut TcpStream| {
        let mut m = spc.lock().unwrap();
        let n = m.entry(s.conn).or_insert(0);
        *n += 1;
        if *n == 1 {
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            Next::KeepAlive
        } else {
            Next::Close
        }
    }));
    let listen = local(free_port());
    let _p = Proxy::start(&simple_config(listen, &[o.addr], "", ""), listen);
    let mut c = Client::connect(listen);
    assert_eq!(c.request(&get("/1")).status, 200);
    // GET on the pooled connection: dies, retried on a fresh one, succeeds.
    let r = c.request(&get("/2"));
    assert_eq!(r.status, 200);
    let gets: Vec<_> = o
        .requests()
        .iter()
        .filter(|s| s.request_line.starts_with("GET /2"))
        .cloned()
        .collect();
    assert_eq!(
        gets.len(),
        2,
        "the idempotent request was retried exactly once"
    );
    assert_ne!(gets[0].conn, gets[1].conn);
    // POST on the pooled connection: dies, not retried, 502.
    let r = c.request(b"POST /3 HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx");
    assert_eq!(r.status, 502);
    let posts = o
        .requests()
        .iter()
        .filter(|s| s.request_line.starts_with("POST /3"))
        .count();
    assert_eq!(posts, 1, "a non-idempotent request is never sent twice");
}

#[test]
fn no_real_server_gives_503() {
    let listen = local(free_port());
    let _p = Proxy::start(&simple_config(listen, &[], "", ""), listen);
    assert_eq!(one(listen, &get("/")).status, 503);
}

#[test]
fn a_body_after_a_head_response_is_not_forwarded_and_the_connection_is_not_reused() {
    let o = Origin::start(Arc::new(|s: &Seen, w: &mut TcpStream| {
        if s.request_line.starts_with("HEAD") {
            // a misbehaving server: a body after a response to HEAD
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSMUGG");
        } else {
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext");
        }
        Next::KeepAlive
    }));
    let listen = local(free_port());
    let _p = Proxy::start(&simple_config(listen, &[o.addr], "", ""), listen);
    let mut c = Client::connect(listen);
    let r = c.request(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!((r.status, r.header("content-length")), (200, Some("5")));
    // the stray bytes never reach the client: the next response is the real one
    let r = c.request(&get("/after"));
    assert_eq!(r.body, b"next");
    assert_eq!(
        o.connections.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the dirty upstream connection was discarded"
    );
}

#[test]
fn interim_responses_are_absorbed_before_the_final_one() {
    let o = Origin::start(Arc::new(|_s: &Seen, w: &mut TcpStream| {
        let _ = w.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal");
        Next::KeepAlive
    }));
    let listen = local(free_port());
    let _p = Proxy::start(&simple_config(listen, &[o.addr], "", ""), listen);
    let mut c = Client::connect(listen);
    let r = c.request(&get("/"));
    assert_eq!((r.status, r.body.as_slice()), (200, &b"final"[..]));
    assert_eq!(c.request(&get("/again")).body, b"final");
}
