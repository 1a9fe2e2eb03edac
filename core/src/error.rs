//! The error type shared by every farpool crate boundary.

use std::fmt;

/// What went wrong, coarse enough to decide what to do about it.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorKind {
    /// The peer cannot be reached (connection refused, reset, dead server).
    Unreachable = 1,
    /// The peer did not answer within the configured bound.
    Timeout = 2,
    /// The lease or slab was revoked (or has expired): the memory is no longer ours.
    Revoked = 3,
    /// An offset or length falls outside the granted slab.
    OutOfRange = 4,
    /// No free memory (slabs, slots, queue entries) to satisfy the request.
    NoSpace = 5,
    /// Data failed its checksum or header check.
    Checksum = 6,
    /// The peer sent something that does not follow the protocol.
    Protocol = 7,
    /// Bad configuration or argument given by the user.
    Config = 8,
    /// The credential (token, epoch, lease) does not match.
    Unauthorized = 9,
    /// An atomic operation on an address that is not 8-byte aligned.
    Unaligned = 10,
    /// The feature or transport is not available here (no device, not built in).
    Unsupported = 11,
    /// An operating-system I/O error.
    Io = 12,
    /// The endpoint or server has been shut down.
    Closed = 13,
    /// The operation was cancelled before it completed.
    Cancelled = 14,
    /// A bug or an unexpected internal state.
    Internal = 15,
}

impl ErrorKind {
    /// All kinds, in wire-code order.
    pub const ALL: [ErrorKind; 15] = [
        Self::Unreachable,
        Self::Timeout,
        Self::Revoked,
        Self::OutOfRange,
        Self::NoSpace,
        Self::Checksum,
        Self::Protocol,
        Self::Config,
        Self::Unauthorized,
        Self::Unaligned,
        Self::Unsupported,
        Self::Io,
        Self::Closed,
        Self::Cancelled,
        Self::Internal,
    ];

    /// The one-byte code used on the wire.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Inverse of [`ErrorKind::code`]; `None` for an unknown code.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code).wrapping_sub(1)).copied()
    }

    /// A short lowercase name, used in metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
            Self::Revoked => "revoked",
            Self::OutOfRange => "out_of_range",
            Self::NoSpace => "no_space",
            Self::Checksum => "checksum",
            Self::Protocol => "protocol",
            Self::Config => "config",
            Self::Unauthorized => "unauthorized",
            Self::Unaligned => "unaligned",
            Self::Unsupported => "unsupported",
            Self::Io => "io",
            Self::Closed => "closed",
            Self::Cancelled => "cancelled",
            Self::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A farpool error: a kind, a message that says what and where, and the underlying cause if any.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    /// Attach the underlying cause.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message (without the cause).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether trying again (after a back-off, or on another server) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Unreachable | ErrorKind::Timeout | ErrorKind::NoSpace | ErrorKind::Io | ErrorKind::Cancelled
        )
    }

    /// A copy with the same kind and message (the cause is rendered into the message).
    pub fn duplicate(&self) -> Self {
        match &self.source {
            None => Self::new(self.kind, self.message.clone()),
            Some(s) => Self::new(self.kind, format!("{}: {s}", self.message)),
        }
    }

    /// Map an I/O error, choosing the kind from the OS error: refused/reset/broken pipe -> `Unreachable`,
    /// timed out / would block -> `Timeout`, end of stream -> `Closed`, else `Io`.
    pub fn io(context: impl Into<String>, e: std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let kind = match e.kind() {
            K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::NotConnected
            | K::HostUnreachable
            | K::NetworkUnreachable
            | K::AddrNotAvailable => ErrorKind::Unreachable,
            K::TimedOut | K::WouldBlock => ErrorKind::Timeout,
            K::UnexpectedEof => ErrorKind::Closed,
            _ => ErrorKind::Io,
        };
        Self::new(kind, context).with_source(e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Shorthand: `Err(Error::new(kind, msg))`.
pub fn fail<T>(kind: ErrorKind, message: impl Into<String>) -> Result<T> {
    Err(Error::new(kind, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_reject_unknown() {
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_code(k.code()), Some(k));
        }
        assert_eq!(ErrorKind::from_code(0), None);
        assert_eq!(ErrorKind::from_code(200), None);
    }

    #[test]
    fn io_errors_map_to_kinds() {
        let e = Error::io("connect", std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(e.kind(), ErrorKind::Unreachable);
        assert!(e.is_retryable());
        let e = Error::io("read", std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        assert_eq!(e.kind(), ErrorKind::Closed);
        assert!(!Error::new(ErrorKind::Revoked, "x").is_retryable());
        assert!(e.to_string().contains("read"));
    }
}
