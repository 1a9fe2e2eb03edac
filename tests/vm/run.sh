#!/bin/bash
# One qemu boot (TCG) that runs the guest suites: Soft-RoCE on the guest's lo, a CPU-less NUMA node 1
# with HMAT, and a CXL type-3 device that 00-env turns into a devdax device.
# usage: tests/vm/run.sh [--build] [SUITE...]
#   --build   run setup-host.sh if qemu or the apt lists are missing, then build-image.sh (skips when
#             the image is up to date; FORCE=1 rebuilds)
#   SUITE     only these suites of tests/vm/guest/ (e.g. 10-perftest, perftest or 10-perftest.sh);
#             00-env always runs, later suites depend on the state it leaves.
# env: FARPOOL_VM_DIR (cache, /tmp/farpool-vm), FARPOOL_BIN_DIR (host binaries, <repo>/target/release),
#      CARGO_TARGET_DIR (<repo>/target), FARPOOL_VM_TIMEOUT (whole boot, 1200 s),
#      FARPOOL_VM_SUITE_TIMEOUT (per suite, 600 s), FARPOOL_VM_LOG (serial log file)
# Output: the guest's RESULT lines, progress lines, then one last line "N passed, N failed, N skipped".
# Exit 0 iff there was at least one RESULT line and no FAIL (a guest that never finishes is a FAIL).
set -euo pipefail
shopt -s lastpipe nullglob
S=$(cd "$(dirname "$0")" && pwd)
. "$S/lib.sh"
REPO=$(cd "$S/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
BIN_DIR=${FARPOOL_BIN_DIR:-$TARGET/release}
BUILD=0; WANT=()
for a in "$@"; do
  case $a in
    --build) BUILD=1 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) vm_die "unknown option $a (see --help)" ;;
    *) WANT+=("$a") ;;
  esac
done

if [ $BUILD = 1 ]; then
  if ! command -v qemu-system-x86_64 >/dev/null || ! vm_has_lists apt-trixie trixie; then
    "$S/setup-host.sh"
  fi
  "$S/build-image.sh"
fi
[ -s "$VM_IMG/base.cpio" ] || vm_die "no image in $VM_IMG: run tests/vm/run.sh --build"

# --- suites (filtered on the host: only the selected ones are put in the share) ---
SUITES=()
for f in "$S"/guest/*.sh; do
  b=${f##*/}; b=${b%.sh}
  keep=$([ ${#WANT[@]} = 0 ] || [ "$b" = 00-env ] && echo 1 || echo 0)
  for w in "${WANT[@]}"; do w=${w%.sh}; [ "$w" = "$b" ] || [ "$w" = "${b#[0-9][0-9]-}" ] && keep=1; done
  [ $keep = 1 ] && SUITES+=("$f")
done
for w in "${WANT[@]}"; do
  w=${w%.sh}; ok=0
  for f in "${SUITES[@]}"; do b=${f##*/}; b=${b%.sh}; [ "$w" = "$b" ] || [ "$w" = "${b#[0-9][0-9]-}" ] && ok=1; done
  [ $ok = 1 ] || vm_die "no suite '$w' in $S/guest/"
done

# --- the 9p share: bin/ (host binaries), guest/ (suites), out/ (written by the guest) ---
mkdir -p "$VM_DIR"
SHARE=$(mktemp -d "$VM_DIR/share.XXXXXX")
trap 'rm -rf "$SHARE"' EXIT
mkdir "$SHARE/bin" "$SHARE/guest" "$SHARE/out"
for f in "$BIN_DIR"/farpool-memserver "$BIN_DIR"/farbench "$BIN_DIR"/farpool-vm-*; do
  [ -f "$f" ] && [ -x "$f" ] && [ "${f%.d}" = "$f" ] && cp -L "$f" "$SHARE/bin/"
done
[ -d "$TARGET/vm-tests" ] && cp -rL "$TARGET/vm-tests/." "$SHARE/bin/"
cp "${SUITES[@]}" "$SHARE/guest/"
chmod -R a+rX "$SHARE"
BINS=$(cd "$SHARE/bin" && ls | tr '\n' ' ')
echo "vm: bin from $BIN_DIR: ${BINS:-(none)}"
echo "vm: suites: $(cd "$SHARE/guest" && ls | tr '\n' ' ')"

# --- boot: NUMA + HMAT + CXL ---
QARGS=(
  # node0: 2 vCPUs + 2G; node1: 2G without CPUs (how CXL/far memory looks to software); HMAT: node1 slower
  -object memory-backend-ram,id=m0,size=2G -object memory-backend-ram,id=m1,size=2G
  -numa node,nodeid=0,cpus=0-1,memdev=m0 -numa node,nodeid=1,memdev=m1,initiator=0 -numa dist,src=0,dst=1,val=24
  -numa hmat-lb,initiator=0,target=0,hierarchy=memory,data-type=access-latency,latency=80
  -numa hmat-lb,initiator=0,target=0,hierarchy=memory,data-type=access-bandwidth,bandwidth=40G
  -numa hmat-lb,initiator=0,target=1,hierarchy=memory,data-type=access-latency,latency=250
  -numa hmat-lb,initiator=0,target=1,hierarchy=memory,data-type=access-bandwidth,bandwidth=10G
  # CXL: host bridge cxl.1 -> root port -> type-3 device with 512M volatile memory; 4G fixed memory window
  -object memory-backend-ram,id=cxlvmem0,share=on,size=512M
  -device pxb-cxl,bus_nr=12,bus=pcie.0,id=cxl.1
  -device cxl-rp,port=0,bus=cxl.1,id=root_port13,chassis=0,slot=2
  -device cxl-type3,bus=root_port13,volatile-memdev=cxlvmem0,id=cxl-vmem0
)
LOG=${FARPOOL_VM_LOG:-$VM_DIR/logs/run-$(date +%Y%m%d-%H%M%S)-$$.log}
mkdir -p "$(dirname "$LOG")"; : >"$LOG"
PASS=0; FAIL=0; SKIP=0; NRES=0; DONE=0; PANIC=""; SUITE=""; STIME=""; SRES=0; SFAIL=0
result() { # result LINE: print and count one RESULT line
  local status
  read -r _ _ status _ <<<"$1"
  echo "$1"; NRES=$((NRES + 1)); SRES=$((SRES + 1))
  case $status in
    PASS) PASS=$((PASS + 1)) ;;
    SKIP) SKIP=$((SKIP + 1)) ;;
    FAIL) FAIL=$((FAIL + 1)); SFAIL=$((SFAIL + 1)) ;;
    *) FAIL=$((FAIL + 1)); SFAIL=$((SFAIL + 1)); echo "vm: malformed RESULT line above counted as FAIL" ;;
  esac
}
echo "vm: booting (log $LOG)"
T0=$(date +%s)
set +e
# hypervisor=off: the CXL core refuses to commit a region when CPUID says "hypervisor".
MEM=4G CPU=max,hypervisor=off SHARE=$SHARE TIMEOUT=${FARPOOL_VM_TIMEOUT:-1200} \
  MACHINE_OPTS=",cxl=on,hmat=on,cxl-fmw.0.targets.0=cxl.1,cxl-fmw.0.size=4G" \
  APPEND="farpool.suite_timeout=${FARPOOL_VM_SUITE_TIMEOUT:-600}" \
  "$S/boot.sh" "${QARGS[@]}" 2>&1 | while IFS= read -r line || [ -n "$line" ]; do
    line=${line//$'\r'/}
    printf '%s\n' "$line" >>"$LOG"
    case $line in
      "RESULT "*) result "$line" ;;
      "===== BEGIN "*) echo "$line"; read -r _ _ SUITE STIME _ <<<"$line"; SRES=0; SFAIL=0 ;;
      "===== END "*)
        echo "$line"; rc=${line#*rc=}; rc=${rc%% *}
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then result "RESULT suite-$SUITE FAIL killed after ${STIME#timeout=}"
        elif [ "$rc" != 0 ] && [ $SFAIL = 0 ]; then result "RESULT suite-$SUITE FAIL exit status $rc"
        elif [ $SRES = 0 ]; then result "RESULT suite-$SUITE FAIL printed no RESULT line"; fi
        SUITE="" ;;
      GUEST-DONE*) DONE=1; echo "$line" ;;
      GUEST-INIT*|HOST:*|"vm: "*|qemu-system-x86_64:*) echo "$line" ;;
      *"Kernel panic"*) PANIC=$line; echo "$line" ;;
    esac
  done
QRC=${PIPESTATUS[0]}
set -e
echo "vm: boot+suites took $(( $(date +%s) - T0 ))s"
if [ $DONE = 0 ]; then
  why="qemu exited with status $QRC"
  [ "$QRC" = 124 ] && why="qemu killed after ${FARPOOL_VM_TIMEOUT:-1200}s (FARPOOL_VM_TIMEOUT)"
  [ -n "$PANIC" ] && why="kernel panic: ${PANIC#*Kernel panic - }"
  [ -n "$SUITE" ] && why="$why, during suite $SUITE"
  result "RESULT vm-guest FAIL guest never printed GUEST-DONE: $why (see $LOG)"
fi
[ $NRES = 0 ] && result "RESULT vm-results FAIL no RESULT line from the guest (see $LOG)"

# --- artefacts: SHARE/out -> target/vm-out (replaced), plus the serial log ---
OUT=$TARGET/vm-out
rm -rf "$OUT"; mkdir -p "$OUT"
cp -r "$SHARE/out/." "$OUT/" 2>/dev/null || true
cp "$LOG" "$OUT/serial.log"
echo "vm: log $LOG; guest output in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
echo "$PASS passed, $FAIL failed, $SKIP skipped"
[ $NRES -gt 0 ] && [ $FAIL = 0 ]
