//! Edge Security Pack filtering: a pure verdict on a request's host (and SNI) and its path,
//! normalised exactly as a real server would read it. Refused requests never reach a real
//! server. No I/O, no allocation beyond the normalised path buffer the caller reuses.

use crate::config::Esp;

/// Why ESP refused a request (the security log's reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Host (or SNI) not among the allowed hosts, or no host at all.
    Host,
    /// Host and SNI name different hosts on a TLS service.
    HostSniMismatch,
    /// The normalised path is in no allowed directory.
    Directory,
    /// The path is in an excluded directory.
    Excluded,
    /// The path cannot be normalised safely (encoded slash or backslash, NUL, bad escapes,
    /// dot segments above the root).
    UnsafePath,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Host => "host not allowed",
            Refusal::HostSniMismatch => "Host and SNI disagree",
            Refusal::Directory => "directory not allowed",
            Refusal::Excluded => "directory excluded",
            Refusal::UnsafePath => "path cannot be normalised safely",
        }
    }

    /// Short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Host => "host",
            Refusal::HostSniMismatch => "host_sni_mismatch",
            Refusal::Directory => "directory",
            Refusal::Excluded => "excluded",
            Refusal::UnsafePath => "unsafe_path",
        }
    }

    pub const ALL: [Refusal; 5] = [
        Refusal::Host,
        Refusal::HostSniMismatch,
        Refusal::Directory,
        Refusal::Excluded,
        Refusal::UnsafePath,
    ];
}

/// A host without its port, for comparison.
pub fn host_only(h: &[u8]) -> &[u8] {
    if h.starts_with(b"[") {
        match h.iter().position(|&b| b == b']') {
            Some(i) => &h[..=i],
            None => h,
        }
    } else {
        h.split(|&b| b == b':').next().unwrap_or(h)
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Normalise the path of a request target into `out` as a real server would interpret it:
/// query dropped, unreserved percent-escapes decoded (others kept, upper-cased), duplicate
/// slashes collapsed, `.` and `..` segments resolved. Anything a server might read two ways
/// is refused: encoded `/` or `\`, a raw `\`, NUL or other controls, malformed escapes, and
/// `..` above the root. Works in `out` alone: no allocation once it has grown.
pub fn normalise(target: &str, out: &mut Vec<u8>) -> Result<(), Refusal> {
    out.clear();
    let path = target.split(['?', '#']).next().unwrap_or("");
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        if path != "*" {
            return Err(Refusal::UnsafePath);
        }
        out.push(b'*');
        return Ok(());
    }
    // `out` holds "/" and the resolved segments, each followed by "/"; the segment being
    // decoded follows from `seg`, and is resolved when its "/" (or the end) comes.
    out.push(b'/');
    let mut seg = 1;
    let mut i = 1;
    loop {
        let c = match bytes.get(i) {
            None => None,
            Some(b'%') => {
                let (h, l) = match (
                    bytes.get(i + 1).and_then(|&c| hex(c)),
                    bytes.get(i + 2).and_then(|&c| hex(c)),
                ) {
                    (Some(h), Some(l)) => (h, l),
                    _ => return Err(Refusal::UnsafePath),
                };
                i += 3;
                let c = h * 16 + l;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    Some(c)
                } else if c == b'/' || c == b'\\' || c < 0x20 || c == 0x7f || c == b'%' {
                    return Err(Refusal::UnsafePath);
                } else {
                    out.extend_from_slice(&[
                        b'%',
                        b"0123456789ABCDEF"[h as usize],
                        b"0123456789ABCDEF"[l as usize],
                    ]);
                    continue;
                }
            }
            Some(b'\\') => return Err(Refusal::UnsafePath),
            Some(&c) if c < 0x20 || c == 0x7f => return Err(Refusal::UnsafePath),
            Some(&c) => {
                i += 1;
                Some(c)
            }
        };
        match c {
            Some(b'/') | None => {
                match &out[seg..] {
                    b"" | b"." => out.truncate(seg),
                    b".." => {
                        out.truncate(seg);
                        if out.len() == 1 {
                            return Err(Refusal::UnsafePath);
                        }
                        let prev = out[..out.len() - 1]
                            .iter()
                            .rposition(|&b| b == b'/')
                            .unwrap_or(0);
                        out.truncate(prev + 1);
                    }
                    // `..;x` is `..` to Tomcat and Jetty (path parameters): read two ways
                    seg_bytes if is_dot_segment_with_params(seg_bytes) => {
                        return Err(Refusal::UnsafePath)
                    }
                    _ if c.is_some() => out.push(b'/'),
                    _ => {}
                }
                if c.is_none() {
                    return Ok(());
                }
                seg = out.len();
            }
            Some(c) => out.push(c),
        }
    }
}

/// A `.` or `..` segment carrying path parameters (`..;jsessionid=x`).
fn is_dot_segment_with_params(seg: &[u8]) -> bool {
    seg.contains(&b';') && matches!(seg.split(|&b| b == b';').next(), Some(b"." | b".."))
}

/// Glob match: `*` any run of characters (slashes included), `?` one character; ASCII case
/// is ignored, as IIS does.
pub fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p].eq_ignore_ascii_case(&text[t])) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some(p);
            mark = t;
            p += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            t = mark;
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p] == b'*' {
        p += 1;
    }
    p == pattern.len()
}

/// The verdict for one request. `host`: the Host field (or absolute-form authority); `sni`:
/// the TLS server name, if any; `path`: the path as `normalise` left it (routing judged the
/// same one).
pub fn check(
    esp: &Esp,
    host: Option<&[u8]>,
    sni: Option<&str>,
    path: Result<&[u8], Refusal>,
) -> Result<(), Refusal> {
    let host = host.map(host_only);
    if let (Some(h), Some(s)) = (host, sni) {
        // `web.example.` and `web.example` are one name (curl keeps the dot in Host only)
        let h = h.strip_suffix(b".").unwrap_or(h);
        if !h.eq_ignore_ascii_case(s.trim_end_matches('.').as_bytes()) {
            return Err(Refusal::HostSniMismatch);
        }
    }
    if !esp.allowed_hosts.is_empty() {
        let name = host.or(sni.map(str::as_bytes)).ok_or(Refusal::Host)?;
        let name = name.strip_suffix(b".").unwrap_or(name);
        if !esp
            .allowed_hosts
            .iter()
            .any(|a| a.as_bytes().eq_ignore_ascii_case(name))
        {
            return Err(Refusal::Host);
        }
    }
    let path = path?;
    if !esp
        .allowed_directories
        .iter()
        .any(|g| glob(g.as_bytes(), path))
    {
        return Err(Refusal::Directory);
    }
    if esp
        .excluded_directories
        .iter()
        .any(|g| glob(g.as_bytes(), path))
    {
        return Err(Refusal::Excluded);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, Refusal> {
        let mut out = Vec::new();
        normalise(p, &mut out).map(|_| String::from_utf8(out).unwrap())
    }

    #[test]
    fn normalises_like_a_server() {
        assert_eq!(norm("/abs/../secret").unwrap(), "/secret");
        assert_eq!(norm("/%61bs/x").unwrap(), "/abs/x");
        assert_eq!(norm("//abs").unwrap(), "/abs");
        assert_eq!(norm("/a/./b//c/").unwrap(), "/a/b/c/");
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
        assert_eq!(norm("/a/%2e%2e/b").unwrap(), "/b");
        assert_eq!(norm("/a%20b?x=/../y").unwrap(), "/a%20b");
        assert_eq!(norm("/a%c3%a9").unwrap(), "/a%C3%A9");
        assert_eq!(norm("/").unwrap(), "/");
        assert_eq!(norm("/.").unwrap(), "/");
        assert_eq!(norm("/a/.").unwrap(), "/a/");
        assert_eq!(norm("/a/b/../../c").unwrap(), "/c");
        assert_eq!(norm("/./admin/x").unwrap(), "/admin/x");
        assert_eq!(norm("/%2e/admin/x").unwrap(), "/admin/x");
        assert_eq!(norm("/x/../admin/x").unwrap(), "/admin/x");
        assert_eq!(norm("/a..b/.c").unwrap(), "/a..b/.c");
        assert_eq!(norm("*").unwrap(), "*");
        assert_eq!(norm("/a;b/..c;d").unwrap(), "/a;b/..c;d");
        assert_eq!(norm("/..").unwrap_err(), Refusal::UnsafePath);
        assert_eq!(norm("/a/../../etc").unwrap_err(), Refusal::UnsafePath);
        for bad in [
            "/a%2fb",
            "/a%2Fb",
            "/a%5cb",
            "/a\\b",
            "/a%00",
            "/a%",
            "/a%4",
            "/a%zz",
            "/a%25",
            "rel",
            "/a\u{1}",
            "/x/..;/admin",
            "/admin/ok/..;x=1/secret",
            "/.;/admin",
        ] {
            assert_eq!(norm(bad).unwrap_err(), Refusal::UnsafePath, "{bad}");
        }
    }

    #[test]
    fn globs() {
        assert!(glob(b"/*", b"/anything/at/all"));
        assert!(glob(b"/abs/*", b"/ABS/x"));
        assert!(!glob(b"/abs/*", b"/absx"));
        assert!(glob(b"/meet/?", b"/meet/1"));
        assert!(!glob(b"/meet/?", b"/meet/12"));
        assert!(glob(b"*.aspx", b"/a/b.aspx"));
        assert!(!glob(b"/a", b"/a/b"));
    }

    fn esp() -> Esp {
        Esp {
            allowed_hosts: vec!["ws-ext.example".into(), "meet.example".into()],
            allowed_directories: vec!["/abs/*".into(), "/meet/*".into()],
            excluded_directories: vec!["/abs/secret*".into()],
            refusal_status: 403,
        }
    }

    #[test]
    fn verdicts() {
        let e = esp();
        let mut s = Vec::new();
        let v = |host: Option<&str>, sni: Option<&str>, path: &str, s: &mut Vec<u8>| {
            let p = normalise(path, s).map(|_| &s[..]);
            check(&e, host.map(str::as_bytes), sni, p)
        };
        assert_eq!(
            v(Some("WS-EXT.example:443"), None, "/abs/x", &mut s),
            Ok(())
        );
        assert_eq!(
            v(Some("evil.example"), None, "/abs/x", &mut s),
            Err(Refusal::Host)
        );
        assert_eq!(v(None, None, "/abs/x", &mut s), Err(Refusal::Host));
        assert_eq!(v(None, Some("meet.example"), "/meet/x", &mut s), Ok(()));
        assert_eq!(
            v(
                Some("meet.example"),
                Some("ws-ext.example"),
                "/meet/x",
                &mut s
            ),
            Err(Refusal::HostSniMismatch)
        );
        // a trailing dot on either side names the same host
        assert_eq!(
            v(
                Some("meet.example."),
                Some("meet.example"),
                "/meet/x",
                &mut s
            ),
            Ok(())
        );
        assert_eq!(
            v(
                Some("meet.example:443"),
                Some("meet.example."),
                "/meet/x",
                &mut s
            ),
            Ok(())
        );
        assert_eq!(
            v(Some("meet.example"), None, "/other", &mut s),
            Err(Refusal::Directory)
        );
        assert_eq!(
            v(Some("meet.example"), None, "/abs/../other", &mut s),
            Err(Refusal::Directory)
        );
        assert_eq!(
            v(Some("meet.example"), None, "/%61bs/secret/x", &mut s),
            Err(Refusal::Excluded)
        );
        assert_eq!(
            v(Some("meet.example"), None, "//abs//secret", &mut s),
            Err(Refusal::Excluded)
        );
        assert_eq!(
            v(Some("meet.example"), None, "/abs%2fsecret", &mut s),
            Err(Refusal::UnsafePath)
        );
    }
}
