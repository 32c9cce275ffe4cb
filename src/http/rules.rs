//! Header rules (HAProxy's set-header / del-header, nginx's add_header): per service or
//! sub-service, ordered `set`, `add` and `delete` on the request to the real server and on the
//! response to the client, values with a few variables, and HSTS on HTTPS responses. Validated
//! once at config load; applying them allocates nothing (values are written straight into the
//! head being built).

/// A value's variable part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Var {
    ClientAddr,
    TlsVersion,
    Sni,
    Service,
    RealServer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Var(Var),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Replace every instance (the received ones go).
    Set,
    /// Append one more.
    Add,
    /// Remove every instance.
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub op: Op,
    /// As written (the case sent).
    pub name: String,
    pub value: Vec<Piece>,
}

/// A service's (or sub-service's) rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderRules {
    /// Strict-Transport-Security on responses to HTTPS clients (replacing the real server's).
    pub hsts: Option<String>,
    pub request: Vec<Rule>,
    pub response: Vec<Rule>,
}

/// What the variables stand for in one request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Vars<'a> {
    pub client_addr: &'a str,
    pub tls_version: &'a str,
    pub sni: &'a str,
    pub service: &'a str,
    pub real_server: &'a str,
}

/// Fields no rule may touch beyond the hop-by-hop ones (`parse::is_hop_by_hop`): framing,
/// the Host routing read, and the forwarding fields we write.
const FORBIDDEN: [&str; 4] = [
    "content-length",
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
];

/// Check a rule's name and value; parse the value's `${variables}`.
pub fn parse_rule(op: Op, name: &str, value: Option<&str>) -> Result<Rule, String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!("{name:?} is not a header field name"));
    }
    if super::parse::is_hop_by_hop(name) || FORBIDDEN.iter().any(|f| name.eq_ignore_ascii_case(f)) {
        return Err(format!(
            "{name} may not be changed by a rule (framing, hop-by-hop, Host or forwarding)"
        ));
    }
    let value = match (op, value) {
        (Op::Delete, None) => Vec::new(),
        (Op::Delete, Some(_)) => return Err("delete takes no value".into()),
        (_, None) => return Err("set and add need a value".into()),
        (_, Some(v)) => parse_value(v)?,
    };
    Ok(Rule {
        op,
        name: name.to_string(),
        value,
    })
}

/// A value: text with `${client_addr}`, `${tls_version}`, `${sni}`, `${service}` and
/// `${real_server}`; no control characters.
pub fn parse_value(v: &str) -> Result<Vec<Piece>, String> {
    if v.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
        return Err("a header value may not hold CR, LF or other control characters".into());
    }
    let mut pieces = Vec::new();
    let mut rest = v;
    while let Some(i) = rest.find("${") {
        if i > 0 {
            pieces.push(Piece::Text(rest[..i].to_string()));
        }
        let end = rest[i..]
            .find('}')
            .ok_or_else(|| format!("{v:?}: an unclosed ${{"))?;
        let var = match &rest[i + 2..i + end] {
            "client_addr" => Var::ClientAddr,
            "tls_version" => Var::TlsVersion,
            "sni" => Var::Sni,
            "service" => Var::Service,
            "real_server" => Var::RealServer,
            other => {
                return Err(format!(
                    "unknown variable ${{{other}}} (client_addr, tls_version, sni, service, real_server)"
                ))
            }
        };
        pieces.push(Piece::Var(var));
        rest = &rest[i + end + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_string()));
    }
    Ok(pieces)
}

/// A received field of this name is left out: a `set` or `delete` rule names it.
pub fn removes(rules: &[Rule], name: &str) -> bool {
    rules
        .iter()
        .any(|r| r.op != Op::Add && r.name.eq_ignore_ascii_case(name))
}

/// Append the fields the rules make, in order (a later `set` or `delete` of a name takes back
/// what an earlier rule added).
pub fn emit(rules: &[Rule], vars: &Vars<'_>, out: &mut Vec<u8>) {
    for (i, r) in rules.iter().enumerate() {
        if r.op == Op::Delete {
            continue;
        }
        let later = &rules[i + 1..];
        if later
            .iter()
            .any(|l| l.op != Op::Add && l.name.eq_ignore_ascii_case(&r.name))
        {
            continue;
        }
        out.extend_from_slice(r.name.as_bytes());
        out.extend_from_slice(b": ");
        for p in &r.value {
            let s = match p {
                Piece::Text(t) => t.as_str(),
                Piece::Var(Var::ClientAddr) => vars.client_addr,
                Piece::Var(Var::TlsVersion) => vars.tls_version,
                Piece::Var(Var::Sni) => vars.sni,
                Piece::Var(Var::Service) => vars.service,
                Piece::Var(Var::RealServer) => vars.real_server,
            };
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_validate_and_emit_in_order() {
        assert!(parse_rule(Op::Set, "Content-Length", Some("1")).is_err());
        assert!(parse_rule(Op::Delete, "Transfer-Encoding", None).is_err());
        assert!(parse_rule(Op::Add, "Keep-Alive", Some("1")).is_err());
        assert!(parse_rule(Op::Set, "X-A", Some("a\r\nX-Evil: 1")).is_err());
        assert!(parse_rule(Op::Set, "X A", Some("1")).is_err());
        assert!(parse_rule(Op::Set, "X-A", Some("${nope}")).is_err());
        assert!(parse_rule(Op::Set, "X-A", None).is_err());
        assert!(parse_rule(Op::Delete, "X-A", Some("1")).is_err());
        let rules = vec![
            parse_rule(Op::Add, "X-Via", Some("a")).unwrap(),
            parse_rule(
                Op::Set,
                "X-Served-By",
                Some("${real_server} for ${client_addr}"),
            )
            .unwrap(),
            parse_rule(Op::Add, "X-Via", Some("b")).unwrap(),
            parse_rule(Op::Delete, "X-Via", None).unwrap(),
            parse_rule(Op::Add, "X-Via", Some("c")).unwrap(),
        ];
        assert!(removes(&rules, "x-served-by") && removes(&rules, "X-VIA"));
        assert!(!removes(&rules, "Server"));
        let mut out = Vec::new();
        let vars = Vars {
            real_server: "10.0.0.1:80",
            client_addr: "192.0.2.7",
            ..Vars::default()
        };
        emit(&rules, &vars, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "X-Served-By: 10.0.0.1:80 for 192.0.2.7\r\nX-Via: c\r\n"
        );
    }
}
