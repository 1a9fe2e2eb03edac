//! Fixed-size frames of the shm Unix socket (format in the module docs of [`super`]).

use farpool_core::{Epoch, Error, ErrorKind, LeaseId, Result, SlabId, Token};

/// Frame magic: ASCII `FPSH`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FPSH");
/// Version of the shm socket protocol.
pub const VERSION: u16 = 1;
/// Request size in bytes.
pub const REQ_LEN: usize = 40;
/// Reply header size in bytes.
pub const REP_LEN: usize = 48;
/// Longest error message in a reply.
pub const MAX_MSG_LEN: usize = 1024;
/// Request op: attach one grant.
pub(crate) const OP_ATTACH: u16 = 1;

/// The grant a frame is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GrantId {
    pub lease: LeaseId,
    pub slab: SlabId,
    pub epoch: Epoch,
    pub token: Token,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn put_id(b: &mut [u8], at: usize, g: &GrantId) {
    b[at..at + 8].copy_from_slice(&g.lease.0.to_le_bytes());
    b[at + 8..at + 12].copy_from_slice(&g.slab.0.to_le_bytes());
    b[at + 16..at + 24].copy_from_slice(&g.epoch.0.to_le_bytes());
    b[at + 24..at + 32].copy_from_slice(&g.token.0.to_le_bytes());
}

fn get_id(b: &[u8], at: usize) -> GrantId {
    GrantId {
        lease: LeaseId(u64_at(b, at)),
        slab: SlabId(u32_at(b, at + 8)),
        epoch: Epoch(u64_at(b, at + 16)),
        token: Token(u64_at(b, at + 24)),
    }
}

/// Encode an attach request.
pub(crate) fn encode_req(g: &GrantId) -> [u8; REQ_LEN] {
    let mut b = [0u8; REQ_LEN];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[6..8].copy_from_slice(&OP_ATTACH.to_le_bytes());
    put_id(&mut b, 8, g);
    b
}

/// Decode a request: the grant it names, or why it is malformed.
pub(crate) fn decode_req(b: &[u8; REQ_LEN]) -> Result<GrantId> {
    let (magic, version, op) = (u32_at(b, 0), u16::from_le_bytes([b[4], b[5]]), u16::from_le_bytes([b[6], b[7]]));
    if magic != MAGIC {
        return Err(Error::new(ErrorKind::Protocol, format!("bad shm request magic {magic:#x}")));
    }
    if version != VERSION {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!("shm protocol version {version}, server speaks {VERSION}"),
        ));
    }
    if op != OP_ATTACH {
        return Err(Error::new(ErrorKind::Protocol, format!("unknown shm request op {op}")));
    }
    Ok(get_id(b, 8))
}

/// A decoded reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RepHeader {
    /// `None` = ok, else the error kind.
    pub error: Option<ErrorKind>,
    pub msg_len: usize,
    pub id: GrantId,
    pub len: u64,
}

/// Encode a reply header (`error == None` = ok).
pub(crate) fn encode_rep(error: Option<ErrorKind>, msg: &str, id: &GrantId, len: u64) -> Vec<u8> {
    let mut msg = msg.as_bytes();
    if msg.len() > MAX_MSG_LEN {
        let mut cut = MAX_MSG_LEN;
        while std::str::from_utf8(&msg[..cut]).is_err() {
            cut -= 1;
        }
        msg = &msg[..cut];
    }
    let mut b = vec![0u8; REP_LEN + msg.len()];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4] = error.map_or(0, ErrorKind::code);
    b[6..8].copy_from_slice(&(msg.len() as u16).to_le_bytes());
    put_id(&mut b, 8, id);
    b[40..48].copy_from_slice(&len.to_le_bytes());
    b[REP_LEN..].copy_from_slice(msg);
    b
}

/// Decode a reply header.
pub(crate) fn decode_rep(b: &[u8; REP_LEN]) -> Result<RepHeader> {
    let magic = u32_at(b, 0);
    if magic != MAGIC {
        return Err(Error::new(ErrorKind::Protocol, format!("bad shm reply magic {magic:#x}")));
    }
    let error = match b[4] {
        0 => None,
        c => Some(ErrorKind::from_code(c).unwrap_or(ErrorKind::Internal)),
    };
    let msg_len = usize::from(u16::from_le_bytes([b[6], b[7]]));
    if msg_len > MAX_MSG_LEN {
        return Err(Error::new(ErrorKind::Protocol, format!("shm reply message of {msg_len} bytes")));
    }
    Ok(RepHeader { error, msg_len, id: get_id(b, 8), len: u64_at(b, 40) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> GrantId {
        GrantId { lease: LeaseId(7), slab: SlabId(3), epoch: Epoch(9), token: Token(0xdead_beef_1234) }
    }

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        assert_eq!(decode_req(&encode_req(&id())).unwrap(), id());
        let mut bad = encode_req(&id());
        bad[0] ^= 1;
        assert_eq!(decode_req(&bad).unwrap_err().kind(), ErrorKind::Protocol);
        let mut bad = encode_req(&id());
        bad[6] = 9;
        assert_eq!(decode_req(&bad).unwrap_err().kind(), ErrorKind::Protocol);
        let r = encode_rep(Some(ErrorKind::Unauthorized), "no", &id(), 0);
        let h = decode_rep(r[..REP_LEN].try_into().unwrap()).unwrap();
        assert_eq!((h.error, h.msg_len, h.id), (Some(ErrorKind::Unauthorized), 2, id()));
        let r = encode_rep(None, "", &id(), 64 << 20);
        let h = decode_rep(r[..REP_LEN].try_into().unwrap()).unwrap();
        assert_eq!((h.error, h.len), (None, 64 << 20));
        let long = "é".repeat(MAX_MSG_LEN);
        let r = encode_rep(Some(ErrorKind::Io), &long, &id(), 0);
        assert!(r.len() <= REP_LEN + MAX_MSG_LEN && std::str::from_utf8(&r[REP_LEN..]).is_ok());
    }
}
