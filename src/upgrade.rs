//! Binary upgrade: the running process starts its binary again and hands the new process,
//! over a Unix socket pair, everything a client could notice: every listening socket (the
//! same kernel sockets, keyed by address and shard, with SCM_RIGHTS), the persistence and
//! session-ticket keys, and each real server's health, operator state and weight. The new
//! process answers `ready` once its shards serve, and only then does the old one stop.

use crate::shard::{Secrets, ServerExport, SourceExport, SourceSeed};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// The environment variable naming the hand-over socket's descriptor in the new process.
pub const ENV_FD: &str = "EDGESHARD_UPGRADE_FD";
/// Descriptors per message (the kernel allows 253).
const FDS_PER_MESSAGE: usize = 200;
/// The hand-over document is bounded (a hostile or broken peer cannot make us allocate more).
const MAX_DOCUMENT: u32 = 16 * 1024 * 1024;

/// What the old process hands over besides the sockets.
#[derive(Serialize, Deserialize)]
pub struct Handover {
    pub cookie_key: String,
    pub ticket_keys: Vec<String>,
    pub servers: Vec<ServerExport>,
    #[serde(default)]
    pub source: Vec<SourceExport>,
    /// The sockets, in the order their descriptors follow: (address, shard).
    pub sockets: Vec<(SocketAddr, usize)>,
    /// Real servers the runtime API added or removed.
    #[serde(default)]
    pub runtime: crate::config::RuntimeServers,
    /// Carried so that counters and the operation sequence do not restart.
    pub control: crate::control::Counters,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let mut k = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

impl Handover {
    pub fn secrets(secrets: &Secrets) -> (String, Vec<String>) {
        (
            hex(&secrets.cookie_key),
            secrets.tickets.masters().iter().map(|m| hex(m)).collect(),
        )
    }

    /// The keys as the new process uses them.
    pub fn to_secrets(&self) -> Result<Secrets, String> {
        let cookie_key = unhex32(&self.cookie_key).ok_or("hand-over: bad persistence key")?;
        let masters: Option<Vec<[u8; 32]>> = self.ticket_keys.iter().map(|k| unhex32(k)).collect();
        let masters = masters.ok_or("hand-over: bad ticket key")?;
        Ok(Secrets {
            tickets: crate::tls::TicketKeys::new(crate::shard::TICKET_PERIOD, Some(&masters))?,
            cookie_key,
        })
    }
}

/// Send the document and the descriptors.
pub fn send(sock: &UnixStream, doc: &Handover, fds: &[RawFd]) -> io::Result<()> {
    let body = serde_json::to_vec(doc).map_err(io::Error::other)?;
    let mut w = sock;
    w.write_all(&(body.len() as u32).to_le_bytes())?;
    w.write_all(&body)?;
    for chunk in fds.chunks(FDS_PER_MESSAGE) {
        send_fds(sock, chunk)?;
    }
    Ok(())
}

/// Receive the document and its descriptors (close-on-exec).
pub fn receive(sock: &UnixStream) -> io::Result<(Handover, Vec<OwnedFd>)> {
    let mut r = sock;
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_DOCUMENT {
        return Err(io::Error::other("hand-over document too large"));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    let doc: Handover = serde_json::from_slice(&body).map_err(io::Error::other)?;
    let mut fds = Vec::with_capacity(doc.sockets.len());
    while fds.len() < doc.sockets.len() {
        let got = recv_fds(sock, FDS_PER_MESSAGE)?;
        if got.is_empty() {
            return Err(io::Error::other("hand-over ended before every socket came"));
        }
        fds.extend(got);
    }
    Ok((doc, fds))
}

fn send_fds(sock: &UnixStream, fds: &[RawFd]) -> io::Result<()> {
    let payload = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    let bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer we set points into live locals above, and
    // the control buffer is CMSG_SPACE(bytes) long, as CMSG_FIRSTHDR/CMSG_DATA expect.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr() as *const u8, libc::CMSG_DATA(cmsg), bytes);
        if libc::sendmsg(sock.as_raw_fd(), &msg, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn recv_fds(sock: &UnixStream, max: usize) -> io::Result<Vec<OwnedFd>> {
    let mut payload = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    let bytes = max * std::mem::size_of::<RawFd>();
    // SAFETY: a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut out = Vec::new();
    // SAFETY: as in send_fds; the kernel writes at most msg_controllen bytes of control
    // data, and we read only the descriptors its SCM_RIGHTS headers say are there.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    out.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other("hand-over: descriptors truncated"));
        }
    }
    Ok(out)
}

/// The old process's view of its real servers, as runtime changes for `config`: health as it
/// was (not re-learnt from "up"), operator state, and weights the runtime API had set.
pub fn changes(
    servers: &[ServerExport],
    config: &crate::config::Config,
) -> Vec<crate::shard::mesh::AdminChange> {
    use crate::shard::mesh::AdminChange;
    let mut out = Vec::new();
    for e in servers {
        let Some(rs) = config.live_servers().find(|rs| rs.key == e.key) else {
            continue;
        };
        if let Some(up) = e.up {
            out.push(AdminChange::Health(rs.id, up));
        }
        out.push(AdminChange::State(rs.id, e.state));
        if e.weight != e.config_weight {
            out.push(AdminChange::Weight(rs.id, e.weight));
        }
    }
    out
}

/// The old process's source-IP persistence entries, for `config`'s pools and servers (an
/// entry whose pool or server is gone is dropped).
pub fn seeds(source: &[SourceExport], config: &crate::config::Config) -> Vec<SourceSeed> {
    source
        .iter()
        .filter_map(|e| {
            let pool = config.pools.iter().find(|p| p.name == e.pool)?;
            let rs = pool
                .servers
                .iter()
                .map(|id| &config.servers[id.0])
                .find(|rs| rs.key == e.server)?;
            Some((
                pool.slot,
                e.ip,
                rs.id,
                std::time::Duration::from_millis(e.remaining_ms),
            ))
        })
        .collect()
}
