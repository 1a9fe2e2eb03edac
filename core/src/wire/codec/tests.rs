use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::ids::*;

fn arb_cred() -> impl Strategy<Value = Credential> {
    (any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>(), any::<u64>()).prop_map(|(l, e, t, r, b)| Credential {
        lease: LeaseId(l),
        epoch: Epoch(e),
        token: Token(t),
        rkey: r,
        base_addr: b,
    })
}

fn arb_kind() -> impl Strategy<Value = ErrorKind> {
    prop::sample::select(ErrorKind::ALL.to_vec())
}

fn arb_bytes() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from)
}

fn arb_op() -> impl Strategy<Value = WireOp> {
    prop_oneof![
        (0..=MAX_OP_LEN).prop_map(|len| WireOp::Read { len }),
        arb_bytes().prop_map(|data| WireOp::Write { data }),
        (any::<u64>(), any::<u64>()).prop_map(|(expect, new)| WireOp::CompareSwap { expect, new }),
        any::<u64>().prop_map(|add| WireOp::FetchAdd { add }),
    ]
}

fn arb_msg() -> impl Strategy<Value = Msg> {
    let s = "[a-z0-9 ]{0,20}";
    prop_oneof![
        (any::<u32>(), any::<u16>(), s, s).prop_map(|(magic, version, host_id, name)| Msg::Hello {
            magic,
            version,
            host_id,
            name
        }),
        (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(req, slabs, flags)| Msg::LeaseRequest {
            req,
            slabs,
            flags
        }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(req, l, secret)| Msg::Renew {
            req,
            lease: LeaseId(l),
            secret
        }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(req, l, secret)| Msg::Release {
            req,
            lease: LeaseId(l),
            secret
        }),
        (any::<u64>(), any::<u32>(), any::<u64>(), arb_cred(), arb_op()).prop_map(|(id, slab, offset, cred, op)| {
            Msg::Op(OpReq { id, addr: RemoteAddr { slab: SlabId(slab), offset, cred }, op })
        }),
        (any::<u64>(), any::<u32>(), any::<u64>())
            .prop_map(|(req, slabs, grace_ms)| Msg::Admin { req, cmd: AdminCmd::Shrink { slabs, grace_ms } }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec((any::<u32>(), any::<u64>(), arb_cred()), 0..5)
        )
            .prop_map(|(req, l, e, secret, g)| Msg::LeaseGranted(LeaseGrant {
                req,
                lease: LeaseId(l),
                expires_in_ms: e,
                secret,
                grants: g.into_iter().map(|(s, len, cred)| SlabGrant { slab: SlabId(s), len, cred }).collect(),
            })),
        (any::<u64>(), arb_bytes()).prop_map(|(id, b)| Msg::OpDone(OpDone { id, result: Ok(OpResult::Data(b)) })),
        (any::<u64>(), any::<u64>()).prop_map(|(id, v)| Msg::OpDone(OpDone { id, result: Ok(OpResult::Value(v)) })),
        (any::<u64>(), arb_kind(), s).prop_map(|(id, k, m)| Msg::OpDone(OpDone { id, result: Err((k, m)) })),
        (any::<u64>(), prop::collection::vec(any::<u32>(), 0..10), any::<u64>()).prop_map(|(l, s, g)| {
            Msg::RevokeNotice { lease: LeaseId(l), slabs: s.into_iter().map(SlabId).collect(), grace_ms: g }
        }),
        (any::<u64>(), prop::collection::vec((s, any::<u64>()), 0..5), s)
            .prop_map(|(req, stats, text)| { Msg::AdminReply { req, stats, text } }),
        (any::<u64>(), arb_kind(), s).prop_map(|(req, kind, message)| Msg::ErrorReply { req, kind, message }),
        (s, any::<u64>()).prop_map(|(reason, grace_ms)| Msg::Goodbye { reason, grace_ms }),
        (any::<u64>(), arb_bytes()).prop_map(|(req, info)| Msg::RdmaConnect { req, info }),
        (any::<u16>(), any::<u64>(), s, any::<u32>(), s, any::<u64>()).prop_map(
            |(version, id, host_id, features, shm_path, slab_size)| Msg::HelloOk(HelloOk {
                version,
                server_id: ServerId(id),
                host_id,
                features,
                shm_path,
                slab_size
            })
        ),
    ]
}

proptest! {
    #[test]
    fn round_trip(msgs in prop::collection::vec(arb_msg(), 1..8)) {
        let mut buf = BytesMut::new();
        for m in &msgs {
            encode(m, &mut buf);
        }
        for m in &msgs {
            let got = decode(&mut buf).unwrap().unwrap();
            prop_assert_eq!(&got, m);
        }
        prop_assert!(decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn split_anywhere_decodes_the_same(m in arb_msg(), cut in 0usize..400) {
        let mut whole = BytesMut::new();
        encode(&m, &mut whole);
        let cut = cut.min(whole.len());
        let mut buf = BytesMut::from(&whole[..cut]);
        let first = decode(&mut buf).unwrap();
        if cut < whole.len() {
            prop_assert!(first.is_none());
            buf.extend_from_slice(&whole[cut..]);
            prop_assert_eq!(decode(&mut buf).unwrap().unwrap(), m);
        } else {
            prop_assert_eq!(first.unwrap(), m);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&data[..]);
        for _ in 0..16 {
            match decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }

    #[test]
    fn corrupted_frames_never_panic(m in arb_msg(), pos in any::<usize>(), byte in any::<u8>()) {
        let mut buf = BytesMut::new();
        encode(&m, &mut buf);
        let pos = pos % buf.len();
        buf[pos] = byte;
        let _ = decode(&mut buf);
    }
}

#[test]
fn oversized_length_prefix_is_rejected_before_buffering() {
    let mut buf = BytesMut::from(&(MAX_FRAME_LEN + 1).to_le_bytes()[..]);
    let e = decode(&mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol);
    assert!(buf.capacity() < 1 << 20, "must not reserve what the peer claims");
}

#[test]
fn lying_list_count_is_rejected() {
    let mut buf = BytesMut::new();
    encode(&Msg::Revoked { lease: LeaseId(1), slabs: vec![SlabId(1)] }, &mut buf);
    // patch the count (after len(4) + tag(1) + lease(8)) to claim a billion entries
    buf[13..17].copy_from_slice(&1_000_000_000u32.to_le_bytes());
    assert_eq!(decode(&mut buf).unwrap_err().kind(), ErrorKind::Protocol);
}

#[test]
fn garbage_tag_and_trailing_bytes_are_protocol_errors() {
    let mut buf = BytesMut::from(&[2u8, 0, 0, 0, 0x7f, 0][..]);
    assert_eq!(decode(&mut buf).unwrap_err().kind(), ErrorKind::Protocol);
    let mut buf = BytesMut::new();
    encode(&Msg::Ping { req: 7 }, &mut buf);
    buf[0] += 1;
    buf.extend_from_slice(&[0]);
    assert_eq!(decode(&mut buf).unwrap_err().kind(), ErrorKind::Protocol);
}

#[test]
fn read_completion_filled_in_place() {
    let mut buf = BytesMut::new();
    encode_op_done_read::<()>(&mut buf, 9, 4, |d| {
        d.copy_from_slice(b"abcd");
        Ok(())
    })
    .unwrap();
    assert!(encode_op_done_read(&mut buf, 10, 4, |_| Err(())).is_err());
    let m = decode(&mut buf).unwrap().unwrap();
    assert_eq!(m, Msg::OpDone(OpDone { id: 9, result: Ok(OpResult::Data(Bytes::from_static(b"abcd"))) }));
    assert!(buf.is_empty(), "a failed fill leaves nothing behind");
}

#[test]
fn read_completion_head_plus_data_equals_the_filled_form() {
    let mut filled = BytesMut::new();
    encode_op_done_read::<()>(&mut filled, 77, 5, |d| {
        d.copy_from_slice(b"hello");
        Ok(())
    })
    .unwrap();
    let mut split = BytesMut::new();
    encode_op_done_read_head(&mut split, 77, 5);
    split.extend_from_slice(b"hello");
    assert_eq!(filled, split);
    let m = decode(&mut split).unwrap().unwrap();
    assert_eq!(m, Msg::OpDone(OpDone { id: 77, result: Ok(OpResult::Data(Bytes::from_static(b"hello"))) }));
}
