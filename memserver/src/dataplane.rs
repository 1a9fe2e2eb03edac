//! Execution of one-sided operations (READ, WRITE, CAS, FETCH_ADD) for TCP clients.
//!
//! Every operation goes through [`crate::grants::GrantTable::with_access`]: lease, epoch, token, expiry,
//! bounds and alignment are checked before any byte of the pool is touched, and a refused operation is
//! answered with an `OpDone` carrying the error kind (the connection keeps working). READ data is copied
//! straight from the pool into the output buffer ([`wire::encode_op_done_read`]); nothing is allocated
//! per operation on success.

use bytes::BytesMut;
use farpool_core::wire::{self, Msg, OpDone, OpReq, OpResult, WireOp};
use farpool_core::{ErrorKind, Result};

use crate::grants::{Denied, GrantTable};
use crate::stats::BatchCounts;

/// Execute `op` and append its completion to `out`.
pub fn execute(grants: &GrantTable, op: &OpReq, now_ms: u64, out: &mut BytesMut, counts: &mut BatchCounts) {
    let id = op.id;
    let addr = &op.addr;
    let outcome: Result<Result<OpResult>, Denied> = match &op.op {
        WireOp::Read { len } => {
            let n = *len as usize;
            let r = grants.with_access(addr, u64::from(*len), false, now_ms, |mem, off| {
                wire::encode_op_done_read(out, id, n, |dst| mem.region.read_uninit(off, dst))
            });
            match r {
                Ok(Ok(())) => {
                    counts.reads += 1;
                    counts.bytes_read += u64::from(*len);
                    return;
                }
                Ok(Err(e)) => Ok(Err(e)),
                Err(d) => Err(d),
            }
        }
        WireOp::Write { data } => grants
            .with_access(addr, data.len() as u64, false, now_ms, |mem, off| mem.region.write_at(off, data))
            .map(|x| x.map(|()| OpResult::Done)),
        WireOp::CompareSwap { expect, new } => grants.with_access(addr, 8, true, now_ms, |mem, off| {
            mem.region.compare_swap_u64(off, *expect, *new).map(OpResult::Value)
        }),
        WireOp::FetchAdd { add } => grants
            .with_access(addr, 8, true, now_ms, |mem, off| mem.region.fetch_add_u64(off, *add).map(OpResult::Value)),
    };
    let result = match outcome {
        Ok(Ok(r)) => {
            match &op.op {
                WireOp::Write { data } => {
                    counts.writes += 1;
                    counts.bytes_written += data.len() as u64;
                }
                WireOp::CompareSwap { .. } => counts.cas += 1,
                WireOp::FetchAdd { .. } => counts.fetch_adds += 1,
                WireOp::Read { .. } => {}
            }
            Ok(r)
        }
        // The grant table checked bounds and alignment already; a region error here is a bug.
        Ok(Err(e)) => Err((ErrorKind::Internal, e.to_string())),
        Err(d) => Err(d),
    };
    if let Err((kind, _)) = &result {
        counts.error(*kind);
    }
    wire::encode(&Msg::OpDone(OpDone { id, result }), out);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use farpool_core::{Credential, Epoch, LeaseId, RemoteAddr, SlabId, Token};
    use farpool_cxl::Backing;

    use super::*;
    use crate::grants::{Grant, LeaseClock, SlabMem};

    fn run(t: &GrantTable, op: WireOp, addr: RemoteAddr, counts: &mut BatchCounts) -> OpDone {
        let mut out = BytesMut::new();
        execute(t, &OpReq { id: 7, addr, op }, 0, &mut out, counts);
        match wire::decode(&mut out).unwrap().unwrap() {
            Msg::OpDone(d) => d,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ops_execute_and_errors_are_completions() {
        let region = Arc::new(Backing::Anon.map(1 << 16, "t").unwrap());
        let t = GrantTable::default();
        t.ensure_len(1);
        let mem = SlabMem { region, offset: 0, len: 1 << 16 };
        let clock = Arc::new(LeaseClock::new(u64::MAX));
        t.insert(SlabId(0), Grant { lease: LeaseId(1), epoch: Epoch(1), token: Token(9), mem, clock });
        let cred = Credential { lease: LeaseId(1), epoch: Epoch(1), token: Token(9), rkey: 0, base_addr: 0 };
        let a = RemoteAddr { slab: SlabId(0), offset: 64, cred };
        let mut c = BatchCounts::default();
        assert_eq!(
            run(&t, WireOp::Write { data: Bytes::from_static(b"abcdefgh") }, a, &mut c).result,
            Ok(OpResult::Done)
        );
        let d = run(&t, WireOp::Read { len: 8 }, a, &mut c);
        assert_eq!(d.result, Ok(OpResult::Data(Bytes::from_static(b"abcdefgh"))));
        assert_eq!(d.id, 7);
        let v = u64::from_le_bytes(*b"abcdefgh");
        assert_eq!(run(&t, WireOp::FetchAdd { add: 1 }, a, &mut c).result, Ok(OpResult::Value(v)));
        assert_eq!(
            run(&t, WireOp::CompareSwap { expect: v + 1, new: 5 }, a, &mut c).result,
            Ok(OpResult::Value(v + 1))
        );
        let e = run(&t, WireOp::FetchAdd { add: 1 }, a.offset_by(1), &mut c).result.unwrap_err();
        assert_eq!(e.0, ErrorKind::Unaligned);
        let e = run(&t, WireOp::Read { len: 64 }, a.offset_by((1 << 16) - 64 - 63), &mut c).result.unwrap_err();
        assert_eq!(e.0, ErrorKind::OutOfRange);
        assert_eq!((c.reads, c.writes, c.cas, c.fetch_adds, c.bytes_read, c.bytes_written), (1, 1, 1, 1, 8, 8));
        assert_eq!(c.errors.iter().sum::<u64>(), 2);
    }
}
