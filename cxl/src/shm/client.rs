//! Client side of the shm socket: attach grants, receive their memfds, map them.
//!
//! Invariants: a received fd is mapped only after checking the reply names exactly the grant asked
//! for and that the file is at least as long as the mapping (a shorter file would SIGBUS on access);
//! the mapping is never shorter than the grant's length, so bounds checked against the grant are in
//! bounds of the mapping.

use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use farpool_core::{Error, ErrorKind, Result, SlabGrant};

use super::proto::{self, GrantId, REP_LEN};
use crate::region::Region;

/// A grant mapped into this process. Cheap to clone (the mapping is shared).
#[derive(Clone, Debug)]
pub struct ShmMapping {
    grant: SlabGrant,
    region: Arc<Region>,
}

impl ShmMapping {
    /// The grant (slab, length, credential).
    pub fn grant(&self) -> &SlabGrant {
        &self.grant
    }

    /// The mapping (at least `grant().len` bytes).
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }
}

/// A connection to a server's shm socket.
#[derive(Debug)]
pub struct ShmClient {
    stream: UnixStream,
    path: PathBuf,
}

impl ShmClient {
    /// Connect to the socket at `path`; `timeout` bounds every request.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .map_err(|e| Error::io(format!("connecting to the shm socket {}", path.display()), e))?;
        stream.set_read_timeout(Some(timeout)).map_err(|e| Error::io("set timeout", e))?;
        stream.set_write_timeout(Some(timeout)).map_err(|e| Error::io("set timeout", e))?;
        Ok(Self { stream, path: path.to_owned() })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ask for the memfd of `grant` and map it.
    pub fn attach(&mut self, grant: &SlabGrant) -> Result<ShmMapping> {
        let id =
            GrantId { lease: grant.cred.lease, slab: grant.slab, epoch: grant.cred.epoch, token: grant.cred.token };
        let sent = self.stream.write_all(&proto::encode_req(&id));
        // A server at its connection bound answers at once and closes, so our request may meet a closed
        // socket: its refusal, already on the way, is the error to report, not the failed write.
        let (hdr, fd) = match (sent, self.recv_header()) {
            (_, Ok(reply)) => reply,
            (Err(e), Err(_)) => return Err(Error::io("sending shm attach", e)),
            (Ok(()), Err(e)) => return Err(e),
        };
        let mut msg = vec![0u8; hdr.msg_len];
        self.stream.read_exact(&mut msg).map_err(|e| Error::io("reading shm reply", e))?;
        if let Some(kind) = hdr.error {
            return Err(Error::new(kind, format!("shm attach refused: {}", String::from_utf8_lossy(&msg))));
        }
        let fd = fd.ok_or_else(|| Error::new(ErrorKind::Protocol, "shm attach reply carried no fd"))?;
        if hdr.id != id {
            return Err(Error::new(ErrorKind::Protocol, format!("shm reply names {:?}, asked for {id:?}", hdr.id)));
        }
        let len = usize::try_from(hdr.len).ok().filter(|&l| l as u64 >= grant.len && l > 0).ok_or_else(|| {
            Error::new(ErrorKind::Protocol, format!("shm grant of {} bytes for a slab of {}", hdr.len, grant.len))
        })?;
        let size = std::fs::File::from(fd.try_clone().map_err(|e| Error::io("dup shm fd", e))?)
            .metadata()
            .map_err(|e| Error::io("fstat shm fd", e))?
            .len();
        if size < len as u64 {
            return Err(Error::new(ErrorKind::Protocol, format!("shm file of {size} bytes, grant says {len}")));
        }
        let desc = format!("shm lease {} slab {} {len} bytes", grant.cred.lease, grant.slab);
        let region = crate::dax::map_fd(fd, len, desc)?;
        Ok(ShmMapping { grant: *grant, region: Arc::new(region) })
    }

    /// Read one reply header, with the fd that came with its first bytes (if any).
    fn recv_header(&mut self) -> Result<(proto::RepHeader, Option<OwnedFd>)> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        let mut buf = [0u8; REP_LEN];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let (got, mut fd) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let m = recvmsg::<()>(self.stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
                .map_err(|e| Error::io("receiving shm reply", std::io::Error::from(e)))?;
            let mut fd = None;
            for c in m.cmsgs().map_err(|e| Error::io("shm control message", std::io::Error::from(e)))? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for raw in fds {
                        // SAFETY: the kernel just installed `raw` in our table for us (SCM_RIGHTS);
                        // nothing else owns it. Extra fds are wrapped too, so they get closed.
                        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                        fd.get_or_insert(owned);
                    }
                }
            }
            (m.bytes, fd)
        };
        if got == 0 {
            return Err(Error::new(ErrorKind::Closed, "shm socket closed by the server"));
        }
        self.stream.read_exact(&mut buf[got..]).map_err(|e| Error::io("reading shm reply", e))?;
        let hdr = proto::decode_rep(&buf)?;
        if hdr.error.is_some() {
            fd = None;
        }
        Ok((hdr, fd))
    }
}
