# vm-timeout: 500
# farpool-rdma over Soft-RoCE (rxe_lo and its GID index from 00-env, in /run/farpool-rdma). One process of
# farpool-vm-rdma holds a memory server and its clients; QP info travels over TCP on 127.0.0.1.
#   rdma-device        auto-selection picks rxe_lo, port 1, the RoCE v2 GID 00-env expects (::ffff:127.0.0.1)
#   rdma-readwrite     READ/WRITE round trips 8 B .. 1 MiB, staged and zero-copy (inline for small writes)
#   rdma-batch         600 ops posted in windows of 64 with selective signaling, each completes once;
#                      the core Transport trait (read/write/fetch_add/compare_swap/execute) on top
#   rdma-atomics       4 threads x N FETCH_ADD and CAS increments: sums exact, FETCH_ADD old values distinct
#   rdma-revoke        deregistering a slab's MR makes the old rkey fail (Revoked), reconnect + regrant work
#   rdma-out-of-range  a READ across the MR end fails at the NIC and the server keeps serving; with the grant
#                      known the transport refuses it (OutOfRange) before posting
#   rdma-peer-gone     the server's queue pairs vanish: the client's READ fails with Unreachable (no hang)
#   rdma-device-tests  rdma/tests/device.rs (the #[ignore]d host tests that need a device), if its binary was
#                      staged as target/vm-tests/farpool-rdma-device-tests:
#                        cargo test --release -p farpool-rdma --features rdma --test device --no-run
#                        (copy the executable it names to target/vm-tests/farpool-rdma-device-tests)
#   rdma-lat-read      8 B READ p50 of farpool-vm-rdma vs ib_read_lat t_typical in this boot: 7 rounds of
#                      ib_read_lat then ours, the median of the per-round ratios (bar: <= 1.2x, printed as
#                      a BAR line: a figure, not a test outcome; TCG timings only mean something as
#                      ratios, and pairing within a round cancels the host's load drifting between
#                      rounds; the line says when ib_read_lat's own medians spread over 1.5x)
# Outputs go to /mnt/host/out/rdma-*.txt.
OUT=${FARPOOL_OUT:-/mnt/host/out}
B=farpool-vm-rdma
export RUST_BACKTRACE=0
if ! command -v $B >/dev/null; then
  echo "RESULT rdma-vm FAIL $B not in /mnt/host/bin (cargo build --release -p farpool-rdma --features rdma --bin $B)"
  exit 0
fi
DEV=""; GIDX=""
[ -r /run/farpool-rdma ] && read -r DEV GIDX </run/farpool-rdma
if [ -z "$DEV" ]; then
  echo "RESULT rdma-device FAIL no RDMA device from 00-env (/run/farpool-rdma missing: env-rxe failed?)"
  exit 0
fi

# --- functional checks ------------------------------------------------------------------------------
timeout 300 $B --device "$DEV" --gid-index "$GIDX" --require-device --atomic-ops 500 >/tmp/rdma-checks.txt 2>&1
rc=$?
grep -v '^RESULT ' /tmp/rdma-checks.txt | tail -20
grep '^RESULT ' /tmp/rdma-checks.txt
cp /tmp/rdma-checks.txt "$OUT/rdma-checks.txt" 2>/dev/null
grep -q '^RESULT ' /tmp/rdma-checks.txt || echo "RESULT rdma-checks FAIL $B exited $rc without a RESULT line"
[ $rc = 124 ] && echo "RESULT rdma-checks FAIL $B killed after 300 s"

# --- the device-needing integration tests of the crate, if staged ------------------------------------
T=farpool-rdma-device-tests
if command -v $T >/dev/null; then
  out=$(timeout 120 $T --ignored --test-threads 1 --nocapture 2>&1); trc=$?
  echo "$out" | tail -8; echo "$out" >"$OUT/rdma-device-tests.txt"
  if grep -q '^SKIPPED' <<<"$out"; then echo "RESULT rdma-device-tests SKIP $(grep -m1 '^SKIPPED' <<<"$out")"
  elif [ $trc = 0 ] && grep -q 'test result: ok' <<<"$out"; then
    echo "RESULT rdma-device-tests PASS $(grep -m1 'test result' <<<"$out")"
  else echo "RESULT rdma-device-tests FAIL exit $trc: $(grep -m1 -E 'panicked|test result' <<<"$out")"; fi
else
  echo "RESULT rdma-device-tests SKIP $T not staged in target/vm-tests (see the header of this suite)"
fi

# --- latency: ours vs perftest, same boot, same device, 7 alternating rounds (TCG timings are noisy:
# the median of the per-round ratios is the figure) ---------------------------------------------------
listening() { grep -qsE ':4853 [0-9A-F]+:0000 0A' /proc/net/tcp /proc/net/tcp6; }   # port 18515
median() { printf '%s\n' "$@" | sort -g | sed -n "$(( ($# + 1) / 2 ))p"; }
PT=(); OURS=(); : >"$OUT/rdma-lat-read.txt"; : >"$OUT/rdma-perftest-read-lat.txt"
ROUNDS=7
for round in $(seq $ROUNDS); do
  timeout 120 ib_read_lat -d "$DEV" -x "$GIDX" -s 8 -n 1000 >/tmp/pt.srv 2>&1 &
  spid=$!
  for _ in $(seq 150); do listening && break; sleep 0.2; done
  timeout 120 ib_read_lat -d "$DEV" -x "$GIDX" -s 8 -n 1000 127.0.0.1 >/tmp/pt.cli 2>&1
  wait $spid
  cat /tmp/pt.cli >>"$OUT/rdma-perftest-read-lat.txt" 2>/dev/null
  # columns: #bytes #iterations t_min t_max t_typical t_avg t_stdev 99% 99.9% (no process substitution:
  # the guest has no /dev/fd)
  set -- $(awk '$1 == 8 && NF >= 8 { print $5; exit }' /tmp/pt.cli); [ -n "${1:-}" ] && PT+=("$1")
  timeout 120 $B --device "$DEV" --lat read --size 8 --iters 1000 >/tmp/lat.txt 2>&1
  cat /tmp/lat.txt | tee -a "$OUT/rdma-lat-read.txt"
  set -- $(sed -n 's/.* p50_us=\([0-9.]*\).*/\1/p' /tmp/lat.txt); [ -n "${1:-}" ] && OURS+=("$1")
  echo "round $round: ib_read_lat t_typical ${PT[$((round - 1))]:-?} us, farpool p50 ${OURS[$((round - 1))]:-?} us"
done
if [ ${#PT[@]} != $ROUNDS ] || [ ${#OURS[@]} != $ROUNDS ]; then
  echo "RESULT rdma-lat-read FAIL missing numbers (ib_read_lat: ${PT[*]}; farpool: ${OURS[*]}; see $OUT)"
else
  pt50=$(median "${PT[@]}"); ours=$(median "${OURS[@]}")
  ptmin=$(printf '%s\n' "${PT[@]}" | sort -g | head -1); ptmax=$(printf '%s\n' "${PT[@]}" | sort -g | tail -1)
  RATIOS=()
  for i in "${!PT[@]}"; do RATIOS+=("$(awk -v a="${OURS[$i]}" -v b="${PT[$i]}" 'BEGIN { printf "%.3f", a / b }')"); done
  ratio=$(median "${RATIOS[@]}"); ratio=$(awk -v r="$ratio" 'BEGIN { printf "%.2f", r }')
  rmed=$(awk -v a="$ours" -v b="$pt50" 'BEGIN { printf "%.2f", a / b }')
  why="8 B READ: median of $ROUNDS per-round ratios ${ratio} (per round: ${RATIOS[*]}); medians farpool p50 ${ours} us, ib_read_lat t_typical ${pt50} us (ratio of the medians ${rmed})"
  # The reference's own steadiness, for the reader: on a loaded host the vCPU threads get descheduled
  # and ib_read_lat's median moves by several times between rounds.
  awk -v lo="$ptmin" -v hi="$ptmax" 'BEGIN { exit !(hi > 1.5 * lo) }' && why="$why (ib_read_lat ranged ${ptmin}..${ptmax} us)"
  if awk -v r="$ratio" 'BEGIN { exit !(r <= 1.2) }'; then
    echo "BAR rdma-lat-read met: $why (bar 1.2)" | tee -a "$OUT/bars.txt"; echo "RESULT rdma-lat-read PASS figures recorded (bar met): $why"
  else
    # a timing bar is a benchmark figure, not a test outcome: recorded, reported, not a failure
    echo "BAR rdma-lat-read missed: $why (bar 1.2)" | tee -a "$OUT/bars.txt"; echo "RESULT rdma-lat-read PASS figures recorded (bar missed): $why"
  fi
fi
timeout 120 $B --device "$DEV" --bw read --size 65536 --iters 2000 --depth 16 2>&1 | tee "$OUT/rdma-bw-read.txt"
