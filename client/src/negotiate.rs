//! Transport negotiation: which transport the pool uses for one server, and why.
//!
//! Owns the whole decision, in one pure function ([`negotiate`]) of the server's offer (its `HelloOk`
//! feature bits and host id) and this client's capabilities ([`LocalCaps`]). The shm and rdma transports
//! plug in by reporting themselves in [`LocalCaps::detect`] and by a connect arm in
//! [`crate::endpoint`]; nothing else changes.
//!
//! Invariants: `Auto` prefers shm (same host, both sides able), then rdma (both sides able), then tcp;
//! a forced choice that is unavailable is `Unsupported` with the reason, never a silent fallback; every
//! outcome carries a human-readable reason, which the pool logs at info and exposes per server.

use farpool_core::wire::{FEATURE_RDMA, FEATURE_SHM, FEATURE_TCP, HelloOk};
use farpool_core::{Error, ErrorKind, Result, TransportKind};

use farpool_rdma::DeviceSelector;

use crate::config::TransportChoice;

/// What this client process can do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalCaps {
    /// This host's identity (kernel boot id); empty when unknown.
    pub host_id: String,
    /// Whether a shared-memory transport is built in and usable here.
    pub shm: bool,
    /// Why RDMA is unusable here (e.g. "no RDMA device: ..."); `None` when an RDMA transport is built
    /// in and its device opened.
    pub rdma_unavailable: Option<String>,
}

impl LocalCaps {
    /// The capabilities of this build on this host: shm on Linux (memfd + SCM_RIGHTS, see
    /// [`crate::shm`]); rdma when built with the `rdma` feature and an RDMA device opens (the device is
    /// opened once per process; see `crate::rdma`).
    pub fn detect() -> Self {
        Self::detect_for(&DeviceSelector::new())
    }

    /// [`LocalCaps::detect`] with this RDMA device selection.
    pub fn detect_for(rdma: &DeviceSelector) -> Self {
        Self {
            host_id: farpool_core::tcp::local_host_id(),
            shm: cfg!(target_os = "linux"),
            rdma_unavailable: crate::rdma::unavailable(rdma),
        }
    }
}

/// What a server offers, taken from its handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerOffer {
    /// `FEATURE_*` bits.
    pub features: u32,
    /// The server's host identity.
    pub host_id: String,
}

impl From<&HelloOk> for ServerOffer {
    fn from(h: &HelloOk) -> Self {
        Self { features: h.features, host_id: h.host_id.clone() }
    }
}

/// The outcome: the transport and why it was chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The transport used for this server.
    pub kind: TransportKind,
    /// Why, in words (logged at info).
    pub reason: String,
}

fn unsupported(msg: String) -> Error {
    Error::new(ErrorKind::Unsupported, msg)
}

/// Why shm is unusable, or `None` when it is usable.
fn shm_blocker(offer: &ServerOffer, local: &LocalCaps) -> Option<String> {
    if !local.shm {
        Some("this client has no shared-memory transport".into())
    } else if offer.features & FEATURE_SHM == 0 {
        Some("the server does not offer shm".into())
    } else if local.host_id.is_empty() || offer.host_id != local.host_id {
        Some(format!("server host {:?} is not this host {:?}", offer.host_id, local.host_id))
    } else {
        None
    }
}

fn rdma_blocker(offer: &ServerOffer, local: &LocalCaps) -> Option<String> {
    if let Some(why) = &local.rdma_unavailable {
        Some(format!("this client has no RDMA transport or device ({why})"))
    } else if offer.features & FEATURE_RDMA == 0 {
        Some("the server does not offer rdma".into())
    } else {
        None
    }
}

fn tcp_blocker(offer: &ServerOffer) -> Option<String> {
    (offer.features & FEATURE_TCP == 0).then(|| "the server does not offer tcp".to_owned())
}

/// Choose the transport for one server. See the module docs.
///
/// ```
/// use farpool::TransportChoice;
/// use farpool::negotiate::{LocalCaps, ServerOffer, negotiate};
/// use farpool_core::TransportKind;
/// use farpool_core::wire::{FEATURE_SHM, FEATURE_TCP};
///
/// let local = LocalCaps { host_id: "boot-1".into(), shm: false, rdma_unavailable: Some("no RDMA device".into()) };
/// let offer = ServerOffer { features: FEATURE_TCP | FEATURE_SHM, host_id: "boot-1".into() };
/// let auto = negotiate(TransportChoice::Auto, &offer, &local).unwrap();
/// assert_eq!(auto.kind, TransportKind::Tcp);
/// assert!(auto.reason.contains("no shared-memory transport"));
/// let forced = negotiate(TransportChoice::Shm, &offer, &local).unwrap_err();
/// assert_eq!(forced.kind(), farpool::ErrorKind::Unsupported);
/// ```
pub fn negotiate(choice: TransportChoice, offer: &ServerOffer, local: &LocalCaps) -> Result<Negotiated> {
    let forced = |kind: TransportKind, blocker: Option<String>| match blocker {
        None => Ok(Negotiated { kind, reason: format!("{kind} forced by configuration and available") }),
        Some(why) => Err(unsupported(format!("transport {kind} was forced but is unavailable: {why}"))),
    };
    match choice {
        TransportChoice::Shm => forced(TransportKind::Shm, shm_blocker(offer, local)),
        TransportChoice::Rdma => forced(TransportKind::Rdma, rdma_blocker(offer, local)),
        TransportChoice::Tcp => forced(TransportKind::Tcp, tcp_blocker(offer)),
        TransportChoice::Auto => {
            let no_shm = match shm_blocker(offer, local) {
                None => return Ok(Negotiated { kind: TransportKind::Shm, reason: "auto: same host, shm".into() }),
                Some(why) => why,
            };
            let no_rdma = match rdma_blocker(offer, local) {
                None => {
                    let reason = format!("auto: rdma (no shm: {no_shm})");
                    return Ok(Negotiated { kind: TransportKind::Rdma, reason });
                }
                Some(why) => why,
            };
            match tcp_blocker(offer) {
                None => {
                    let reason = format!("auto: tcp (no shm: {no_shm}; no rdma: {no_rdma})");
                    Ok(Negotiated { kind: TransportKind::Tcp, reason })
                }
                Some(why) => Err(unsupported(format!(
                    "auto: no common transport (no shm: {no_shm}; no rdma: {no_rdma}; no tcp: {why})"
                ))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(features: u32, host: &str) -> ServerOffer {
        ServerOffer { features, host_id: host.into() }
    }

    fn caps(shm: bool, rdma: bool) -> LocalCaps {
        LocalCaps { host_id: "h1".into(), shm, rdma_unavailable: (!rdma).then(|| "no RDMA device: test".into()) }
    }

    #[test]
    fn auto_prefers_shm_then_rdma_then_tcp() {
        let all = FEATURE_SHM | FEATURE_RDMA | FEATURE_TCP;
        let n = negotiate(TransportChoice::Auto, &offer(all, "h1"), &caps(true, true)).unwrap();
        assert_eq!(n.kind, TransportKind::Shm);
        let n = negotiate(TransportChoice::Auto, &offer(all, "h2"), &caps(true, true)).unwrap();
        assert_eq!(n.kind, TransportKind::Rdma);
        assert!(n.reason.contains("not this host"), "{}", n.reason);
        let n = negotiate(TransportChoice::Auto, &offer(all, "h1"), &caps(false, false)).unwrap();
        assert_eq!(n.kind, TransportKind::Tcp);
        assert!(n.reason.contains("no shared-memory transport"), "{}", n.reason);
        let n = negotiate(TransportChoice::Auto, &offer(FEATURE_TCP, "h1"), &caps(true, true)).unwrap();
        assert_eq!(n.kind, TransportKind::Tcp);
        assert!(n.reason.contains("does not offer shm") && n.reason.contains("does not offer rdma"));
    }

    #[test]
    fn forced_unavailable_is_unsupported_never_fallback() {
        let tcp_only = offer(FEATURE_TCP, "h1");
        for choice in [TransportChoice::Shm, TransportChoice::Rdma] {
            let e = negotiate(choice, &tcp_only, &caps(true, true)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported);
            let e = negotiate(choice, &offer(FEATURE_SHM | FEATURE_RDMA, "h1"), &caps(false, false)).unwrap_err();
            assert!(e.message().contains("forced"), "{e}");
        }
        let e = negotiate(TransportChoice::Tcp, &offer(FEATURE_SHM, "h1"), &caps(false, false)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let e = negotiate(TransportChoice::Auto, &offer(0, "h1"), &caps(false, false)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let n = negotiate(TransportChoice::Tcp, &tcp_only, &caps(false, false)).unwrap();
        assert_eq!(n.kind, TransportKind::Tcp);
    }

    #[test]
    fn shm_needs_a_known_shared_host() {
        let mut c = caps(true, false);
        c.host_id.clear();
        let e = negotiate(TransportChoice::Shm, &offer(FEATURE_SHM, ""), &c).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let n = negotiate(TransportChoice::Shm, &offer(FEATURE_SHM, "h1"), &caps(true, false)).unwrap();
        assert_eq!(n.kind, TransportKind::Shm);
    }

    #[test]
    fn detected_caps_pick_shm_on_this_host_and_tcp_elsewhere() {
        let local = LocalCaps::detect();
        assert!(local.shm && !local.host_id.is_empty());
        let n = negotiate(TransportChoice::Auto, &offer(FEATURE_TCP | FEATURE_SHM, &local.host_id), &local).unwrap();
        assert_eq!(n.kind, TransportKind::Shm);
        let n = negotiate(TransportChoice::Auto, &offer(FEATURE_TCP | FEATURE_SHM, "another-host"), &local).unwrap();
        assert_eq!(n.kind, TransportKind::Tcp);
    }
}
