#!/usr/bin/env bash
# Run every farpool test: host unit/property/integration tests (nextest), the loom model checks, and
# the RDMA/NUMA/CXL tests inside a qemu guest (tests/vm). Exits non-zero on any failure.
#   scripts/test.sh            everything
#   SKIP_VM=1 scripts/test.sh  host tests only (the VM stage needs root and ~5 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
ts() { echo "[test $(date +%T)] $*"; }
scripts/install-deps.sh
if ! command -v cargo-nextest >/dev/null; then
  ts "cargo-nextest missing: installing it from crates.io (a few minutes)"
  cargo install cargo-nextest --locked
fi
# The rdma feature is on everywhere: on a host without RDMA the code takes its "no device" path,
# and the device tests are #[ignore]d with the reason (nextest counts them as skipped).
FEATURES="farpool-rdma/rdma,farpool/rdma,farpool-memserver/rdma,farpool-bench/rdma"
ts "host tests (nextest, release, features $FEATURES)"
cargo nextest run --workspace --release --features "$FEATURES" --no-fail-fast
ts "doc tests"
cargo test --workspace --release --doc --features "$FEATURES"
ts "loom model checks (the tier's lock-free slot state word)"
# Our own cfg name: `--cfg loom` would also switch tokio into its loom mode and break its dependents.
LOOM_MAX_PREEMPTIONS=${LOOM_MAX_PREEMPTIONS:-3} RUSTFLAGS="--cfg farpool_loom" CARGO_TARGET_DIR=target/loom \
  cargo test -p farpool --release --lib tier::slot
if [ "${SKIP_VM:-0}" = 1 ]; then
  ts "VM stage skipped (SKIP_VM=1): RDMA/NUMA/CXL tests did not run"
  exit 0
fi
ts "release binaries for the guest"
cargo build --release --features "$FEATURES" --bins
# farpool-rdma's device tests (#[ignore]d on the host) run in the guest (tests/vm/guest/40-rdma.sh).
VMT=${CARGO_TARGET_DIR:-target}/vm-tests
mkdir -p "$VMT"
DT=$(cargo test --release -p farpool-rdma --features rdma --test device --no-run --message-format=json \
  | grep '"name":"device"' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
[ -n "$DT" ] && cp "$DT" "$VMT/farpool-rdma-device-tests"
ts "qemu guest tests (Soft-RoCE, CPU-less NUMA node, CXL type-3)"
# CI builds the guest image from scratch; elsewhere an up-to-date cached image is reused.
if [ "${CI:-}" = true ]; then export FORCE=${FORCE:-1}; else export FORCE=${FORCE:-0}; fi
.ci/vm.sh
