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
}

impl ProxyError {
    pub fn client(status: u16, reason: &'static str) -> Self {
        ProxyError {
            status,
            fault: Fault::Client,
            reason,
        }
    }
    pub fn upstream(status: u16, reason: &'static str) -> Self {
        ProxyError {
            status,
            fault: Fault::Upstream,
            reason,
        }
    }
    pub fn policy(status: u16, reason: &'static str) -> Self {
        ProxyError {
            status,
            fault: Fault::Policy,
            reason,
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?}): {}", self.status, self.fault, self.reason)
    }
}
