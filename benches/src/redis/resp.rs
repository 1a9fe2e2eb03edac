//! A minimal RESP2 client codec: encode commands, parse the replies GET/SET/INCRBY/PING produce.
//!
//! Invariant: parsing never panics and never buffers more than one reply's bytes beyond what was
//! received; a bulk length above [`MAX_BULK_LEN`] or a malformed line is an error.

use anyhow::{Result, bail};
use bytes::{Bytes, BytesMut};

/// Largest bulk string accepted: 2 MiB (the bench moves at most 1 MiB per value).
pub const MAX_BULK_LEN: usize = 2 << 20;
/// Longest status/error/integer line accepted.
const MAX_LINE_LEN: usize = 64 * 1024;

/// One RESP reply (arrays are not needed by the bench and are rejected).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:42`
    Integer(i64),
    /// `$n` bulk string, or `None` for `$-1` (nil).
    Bulk(Option<Bytes>),
}

/// Append `args` as one RESP command (an array of bulk strings) to `out`.
pub fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Position of the first `\r\n` in `buf`, if any.
fn line_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// Take one complete reply off the front of `buf`; `Ok(None)` when more bytes are needed.
pub fn parse_reply(buf: &mut BytesMut) -> Result<Option<Reply>> {
    let Some(&kind) = buf.first() else { return Ok(None) };
    let scan = &buf[..buf.len().min(MAX_LINE_LEN + 2)];
    let Some(end) = line_end(scan) else {
        if buf.len() > MAX_LINE_LEN {
            bail!("RESP line longer than {MAX_LINE_LEN} bytes");
        }
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[1..end]).map_err(|_| anyhow::anyhow!("RESP line is not UTF-8"))?;
    let reply = match kind {
        b'+' => Reply::Simple(line.to_owned()),
        b'-' => Reply::Error(line.to_owned()),
        b':' => Reply::Integer(line.parse().map_err(|_| anyhow::anyhow!("bad RESP integer {line:?}"))?),
        b'$' => {
            let n: i64 = line.parse().map_err(|_| anyhow::anyhow!("bad RESP bulk length {line:?}"))?;
            if n == -1 {
                let _ = buf.split_to(end + 2);
                return Ok(Some(Reply::Bulk(None)));
            }
            let n = usize::try_from(n).map_err(|_| anyhow::anyhow!("negative RESP bulk length {n}"))?;
            if n > MAX_BULK_LEN {
                bail!("RESP bulk of {n} bytes exceeds {MAX_BULK_LEN}");
            }
            let total = end + 2 + n + 2;
            if buf.len() < total {
                buf.reserve(total - buf.len());
                return Ok(None);
            }
            if &buf[total - 2..total] != b"\r\n" {
                bail!("RESP bulk not terminated by CRLF");
            }
            let mut frame = buf.split_to(total);
            let _ = frame.split_to(end + 2);
            frame.truncate(n);
            return Ok(Some(Reply::Bulk(Some(frame.freeze()))));
        }
        other => bail!("unsupported RESP reply type {:?}", other as char),
    };
    let _ = buf.split_to(end + 2);
    Ok(Some(reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands() {
        let mut out = Vec::new();
        encode_command(&mut out, &[b"SET", b"k", b"vv"]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nvv\r\n");
    }

    #[test]
    fn parses_every_reply_incrementally() {
        let wire = b"+OK\r\n-ERR no\r\n:42\r\n$3\r\nabc\r\n$-1\r\n$0\r\n\r\n";
        let want = [
            Reply::Simple("OK".into()),
            Reply::Error("ERR no".into()),
            Reply::Integer(42),
            Reply::Bulk(Some(Bytes::from_static(b"abc"))),
            Reply::Bulk(None),
            Reply::Bulk(Some(Bytes::new())),
        ];
        // Feed one byte at a time: every prefix must parse to "need more" or a whole reply.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &b in wire.iter() {
            buf.extend_from_slice(&[b]);
            while let Some(r) = parse_reply(&mut buf).unwrap() {
                got.push(r);
            }
        }
        assert_eq!(got, want);
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_garbage() {
        for bad in [&b"*1\r\n"[..], b"$abc\r\n", b"$99999999\r\n", b":x\r\n", b"$2\r\nabcd"] {
            let mut buf = BytesMut::from(bad);
            assert!(parse_reply(&mut buf).is_err(), "{bad:?}");
        }
        let mut long = BytesMut::from(&vec![b'+'; MAX_LINE_LEN + 10][..]);
        assert!(parse_reply(&mut long).is_err());
    }
}
