//! Execution of one-sided operations (READ, WRITE, CAS, FETCH_ADD) for TCP clients.
//!
//! Every operation goes through [`crate::grants::GrantTable::with_access`]: lease, epoch, token, expiry,
//! bounds and alignment are checked before any byte of the pool is touched, and a refused operation is
//! answered with an `OpDone` carrying the error kind (the connection keeps working). READ data is either
//! copied straight from the pool into the output buffer ([`wire::encode_op_done_read`]) or, for a
//! connection's batch executed under one [`GrantView`] ([`execute_in`] with `deferred`), left in the pool
//! as a [`Deferred`] span that the connection splices into one `writev(2)`; nothing is allocated per
//! operation on success.

use bytes::BytesMut;
use farpool_core::wire::{self, Msg, OpDone, OpReq, OpResult, WireOp};
use farpool_core::{ErrorKind, Result};

use farpool_cxl::gather::Span;

use crate::grants::{Denied, GrantView};
use crate::stats::BatchCounts;

/// READs of at least this many bytes are sent straight from pool memory when the caller collects spans
/// (a smaller copy costs less than one more iovec).
pub const ZERO_COPY_MIN_BYTES: usize = 2048;

/// READ data that belongs in the output right at offset `at` of `out`, to be sent from pool memory.
#[derive(Clone, Copy, Debug)]
pub struct Deferred<'v> {
    /// Offset in the output buffer where the data goes (right after its completion's head).
    pub at: usize,
    /// The pool bytes.
    pub span: Span<'v>,
}

/// Execute `op` under `view` and append its completion to `out`. With `deferred`, a successful READ of
/// at least [`ZERO_COPY_MIN_BYTES`] appends only the completion's head and pushes its data as a span of
/// pool memory: the caller must send `out` with the spans spliced in (or copy them) before dropping
/// `view`.
pub fn execute_in<'v>(
    view: &'v GrantView<'_>,
    op: &OpReq,
    now_ms: u64,
    out: &mut BytesMut,
    counts: &mut BatchCounts,
    deferred: Option<&mut Vec<Deferred<'v>>>,
) {
    let id = op.id;
    let addr = &op.addr;
    let outcome: Result<Result<OpResult>, Denied> = match &op.op {
        WireOp::Read { len } => {
            let n = *len as usize;
            let r = view.with_access(addr, u64::from(*len), false, now_ms, |mem, off| match deferred {
                Some(d) if n >= ZERO_COPY_MIN_BYTES => mem.region.span(off, n).map(|span| {
                    wire::encode_op_done_read_head(out, id, n);
                    d.push(Deferred { at: out.len(), span });
                }),
                _ => wire::encode_op_done_read(out, id, n, |dst| mem.region.read_uninit(off, dst)),
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
        WireOp::Write { data } => view
            .with_access(addr, data.len() as u64, false, now_ms, |mem, off| mem.region.write_at(off, data))
            .map(|x| x.map(|()| OpResult::Done)),
        WireOp::CompareSwap { expect, new } => view.with_access(addr, 8, true, now_ms, |mem, off| {
            mem.region.compare_swap_u64(off, *expect, *new).map(OpResult::Value)
        }),
        WireOp::FetchAdd { add } => {
            view.with_access(addr, 8, true, now_ms, |mem, off| mem.region.fetch_add_u64(off, *add).map(OpResult::Value))
        }
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
    use crate::grants::{Grant, GrantTable, LeaseClock, SlabMem};

    fn run(t: &GrantTable, op: WireOp, addr: RemoteAddr, counts: &mut BatchCounts) -> OpDone {
        let mut out = BytesMut::new();
        execute_in(&t.view(), &OpReq { id: 7, addr, op }, 0, &mut out, counts, None);
        match wire::decode(&mut out).unwrap().unwrap() {
            Msg::OpDone(d) => d,
            other => panic!("{other:?}"),
        }
    }

    /// A table granting slab 0 (all of `region`, 64 KiB) to lease 1, and an address at offset 0 of it.
    fn one_grant(region: Arc<farpool_cxl::Region>) -> (GrantTable, RemoteAddr) {
        let t = GrantTable::default();
        t.ensure_len(1);
        let mem = SlabMem { region, offset: 0, len: 1 << 16 };
        let clock = Arc::new(LeaseClock::new(u64::MAX));
        t.insert(SlabId(0), Grant { lease: LeaseId(1), epoch: Epoch(1), token: Token(9), mem, clock });
        let cred = Credential { lease: LeaseId(1), epoch: Epoch(1), token: Token(9), rkey: 0, base_addr: 0 };
        (t, RemoteAddr { slab: SlabId(0), offset: 0, cred })
    }

    #[test]
    fn ops_execute_and_errors_are_completions() {
        let (t, a) = one_grant(Arc::new(Backing::Anon.map(1 << 16, "t").unwrap()));
        let a = a.offset_by(64);
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

    /// Deferred READ data spliced back in gives byte for byte the copied form; small READs and refused
    /// ones are never deferred.
    #[test]
    fn deferred_reads_splice_to_the_copied_form() {
        let region = Arc::new(Backing::Anon.map(1 << 16, "t").unwrap());
        let pattern: Vec<u8> = (0..(1usize << 16)).map(|i| (i % 249) as u8).collect();
        region.write_at(0, &pattern).unwrap();
        let (t, a) = one_grant(region);
        let ops = [
            (a.offset_by(100), ZERO_COPY_MIN_BYTES as u32),
            (a, 64),
            (a.offset_by(5000), 9000),
            (a.offset_by((1 << 16) - 10), 4096), // out of range: an error completion, nothing deferred
        ];
        let (mut copied, mut head, mut c) = (BytesMut::new(), BytesMut::new(), BatchCounts::default());
        let view = t.view();
        let mut deferred = Vec::new();
        for (i, (addr, len)) in ops.iter().enumerate() {
            let op = OpReq { id: i as u64, addr: *addr, op: WireOp::Read { len: *len } };
            execute_in(&view, &op, 0, &mut copied, &mut c, None);
            execute_in(&view, &op, 0, &mut head, &mut c, Some(&mut deferred));
        }
        assert_eq!(deferred.len(), 2, "the 2 KiB and 9000-byte reads are deferred");
        let mut spliced = BytesMut::new();
        let mut prev = 0;
        for d in &deferred {
            spliced.extend_from_slice(&head[prev..d.at]);
            d.span.copy_into(&mut spliced);
            prev = d.at;
        }
        spliced.extend_from_slice(&head[prev..]);
        assert_eq!(spliced, copied);
    }
}
