//! Why a request failed and whose fault it was. Turned into a response in exactly one place
//! (`proxy::refuse`), so every failure answers the same way and is logged the same way.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The client sent something we refuse.
    Client,
    /// A real server failed, timed out or answered wrongly.
    Upstream,
    /// Configuration or state leaves nowhere to send the request (no server, limits).
    Policy,
}

#[derive(Debug, Clone, Copy)]
pub struct ProxyError {
    pub status: u16,
    pub fault: Fault,
    pub reason: &'static str,
    /// Security-log event name, for failures the security log records.
    pub event: Option<&'static str>,
    /// The real server it happened on, for the logs (upstream failures).
    pub server: Option<crate::config::ServerId>,
    /// Where with the real server it failed: connect, tls, send, response_head, body.
    pub phase: Option<&'static str>,
}

/// The security-log event of a refused client request.
fn client_event(status: u16, reason: &str) -> &'static str {
    let framing = [
        "Content-Length",
        "Transfer-Encoding",
        "transfer coding",
        "chunk",
        "bare CR",
    ];
    if status == 414 || status == 431 || status == 413 {
        "oversized"
    } else if framing.iter().any(|w| reason.contains(w)) {
        "smuggling"
    } else if status == 408 {
        "timeout"
    } else {
        "malformed"
    }
}

impl ProxyError {
    pub fn client(status: u16, reason: &'static str) -> Self {
        ProxyError {
            status,
            fault: Fault::Client,
            reason,
            event: Some(client_event(status, reason)),
            server: None,
            phase: None,
        }
    }
    pub fn upstream(status: u16, reason: &'static str) -> Self {
        ProxyError {
            status,
            fault: Fault::Upstream,
            reason,
            event: None,
            server: None,
            phase: None,
        }
    }
    pub fn policy(status: u16, reason: &'static str) -> Self {
        ProxyError {
            status,
            fault: Fault::Policy,
            reason,
            event: None,
            server: None,
            phase: None,
        }
    }
    /// The phase of the exchange with the real server it failed in.
    pub fn in_phase(mut self, phase: &'static str) -> Self {
        self.phase = Some(phase);
        self
    }
    /// The real server this failure happened on.
    pub fn at(mut self, server: crate::config::ServerId) -> Self {
        self.server = Some(server);
        self
    }
    /// Record this failure in the security log under `event`.
    pub fn with_event(mut self, event: &'static str) -> Self {
        self.event = Some(event);
        self
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?}): {}", self.status, self.fault, self.reason)
    }
}
