#!/bin/bash
# CI stage "vm": the qemu guest tests (Soft-RoCE, CPU-less NUMA node, CXL -> devdax).
# Call after `cargo build --release`: tests/vm/run.sh stages target/release/{farpool-memserver,farbench,
# farpool-vm-*} and target/vm-tests/* into the guest. Steps: host packages (private apt lists), image
# built from scratch (FORCE=0 reuses an up-to-date one), one boot running every suite.
# Exit status: 0 iff every step worked and every suite passed. An unreachable mirror is a failure.
# env: FARPOOL_VM_DIR (cache, /tmp/farpool-vm) and the run.sh variables (see tests/vm/run.sh --help).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VM=$ROOT/tests/vm
T0=$(date +%s)
fail() { echo "ci/vm: FAIL: $*" >&2; exit 1; }
stage() { echo "ci/vm: === $* (+$(( $(date +%s) - T0 ))s)"; }

stage "setup-host"
"$VM/setup-host.sh" || fail "setup-host.sh failed (mirror unreachable or apt error; output above)"
stage "build image (FORCE=${FORCE:-1})"
FORCE=${FORCE:-1} "$VM/build-image.sh" || fail "build-image.sh failed (output above)"
[ -x "${FARPOOL_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}/farpool-memserver" ] \
  || echo "ci/vm: warning: no farpool-memserver in target/release: run cargo build --release first" >&2
stage "boot + suites"
"$VM/run.sh"; rc=$?
echo "ci/vm: run.sh exit status $rc after $(( $(date +%s) - T0 ))s" >&2
[ $rc = 0 ] || fail "VM suites failed (exit $rc); serial log in ${CARGO_TARGET_DIR:-$ROOT/target}/vm-out/serial.log"
