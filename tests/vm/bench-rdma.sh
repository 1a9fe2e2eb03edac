#!/bin/bash
# The rdma bars over several boots: boots the guest N times with only 00-env and 50-rdma-pool (which
# runs `farbench rdma --rounds 7 --lat-rounds 27` beside perftest), keeps each boot's farbench JSON,
# then pools every round with `farbench rdma-report`. One boot's median swings with rxe's latency
# modes (BENCHMARKS.md, rdma, sessions 6 and 11); the pooled median and its 95% interval over
# every round move much less.
# usage: tests/vm/bench-rdma.sh [--boots N] [--out DIR]
#   --boots N   boots to run (default 3; ~3.5 min each on 2 host cores)
#   --out DIR   where boot-K.json, boot-K.txt and pooled.txt go (default <target>/vm-bench); the
#               suite's shorter run in the default CPU layout goes to boot-K-shared.json and
#               pooled-shared.txt
# Needs the guest binaries built with the rdma features (see the header of guest/50-rdma-pool.sh)
# and the image (tests/vm/run.sh --build). Exit 0 iff every boot produced figures; the bars are
# reported, not enforced (they are benchmark figures under emulation).
set -euo pipefail
S=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$S/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
BIN_DIR=${FARPOOL_BIN_DIR:-$TARGET/release}
BOOTS=3; OUTDIR=$TARGET/vm-bench
while [ $# -gt 0 ]; do
  case $1 in
    --boots) BOOTS=${2:?--boots needs a number}; shift 2 ;;
    --out) OUTDIR=${2:?--out needs a directory}; shift 2 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-rdma: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $BOOTS in ''|*[!0-9]*|0) echo "bench-rdma: --boots must be a positive number, not '$BOOTS'" >&2; exit 2 ;; esac
[ -x "$BIN_DIR/farbench" ] || { echo "bench-rdma: no $BIN_DIR/farbench (cargo build --release with the rdma features)" >&2; exit 2; }
mkdir -p "$OUTDIR"
JSONS=(); SHARED=()
for k in $(seq "$BOOTS"); do
  echo "bench-rdma: boot $k of $BOOTS ($(date +%T))"
  if ! "$S/run.sh" rdma-pool >"$OUTDIR/boot-$k.log" 2>&1; then
    echo "bench-rdma: boot $k reported a failure (log $OUTDIR/boot-$k.log): $(tail -1 "$OUTDIR/boot-$k.log")" >&2
  fi
  if [ -s "$TARGET/vm-out/farbench-rdma.json" ]; then
    cp "$TARGET/vm-out/farbench-rdma.json" "$OUTDIR/boot-$k.json"
    cp "$TARGET/vm-out/farbench-rdma.txt" "$OUTDIR/boot-$k.txt" 2>/dev/null || true
    JSONS+=("$OUTDIR/boot-$k.json")
    if [ -s "$TARGET/vm-out/farbench-rdma-shared.json" ]; then
      cp "$TARGET/vm-out/farbench-rdma-shared.json" "$OUTDIR/boot-$k-shared.json"
      SHARED+=("$OUTDIR/boot-$k-shared.json")
    fi
    grep -h '^BAR\|^FIGURE' "$TARGET/vm-out/bars.txt" | sed "s/^/bench-rdma: boot $k: /" || true
  else
    echo "bench-rdma: boot $k produced no farbench-rdma.json" >&2
  fi
  rm -f "$TARGET/vm-out/farbench-rdma.json"
done
[ ${#JSONS[@]} -gt 0 ] || { echo "bench-rdma: no boot produced figures" >&2; exit 1; }
"$BIN_DIR/farbench" rdma-report --no-check --json "$OUTDIR/pooled.json" "${JSONS[@]}" | tee "$OUTDIR/pooled.txt"
if [ ${#SHARED[@]} -gt 0 ]; then
  echo "bench-rdma: the default CPU layout (nothing pinned; unbarred, for comparison):"
  "$BIN_DIR/farbench" rdma-report --no-check "${SHARED[@]}" | grep ' paired' | tee "$OUTDIR/pooled-shared.txt"
fi
echo "bench-rdma: ${#JSONS[@]} of $BOOTS boots pooled; figures in $OUTDIR"
[ ${#JSONS[@]} = "$BOOTS" ]
