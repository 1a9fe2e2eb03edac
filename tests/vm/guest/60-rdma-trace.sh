# vm-timeout: 300
# rdma-trace: which of Soft-RoCE's two latency modes a depth-1 READ loop runs in (a diagnostic; needs
# `perf` in the guest image: FARPOOL_VM_EXTRA_PKGS=linux-perf with its own FARPOOL_VM_DIR, else SKIP).
#
# On rxe (kernel 6.12) every READ passes through rxe's work items on an unbound workqueue: the sender's
# send task (requester, and later the completer that writes the CQE) and the responder's receive task.
# A post rings the doorbell with write() on the uverbs fd. If that write reaches the send task while the
# task is still running (it is finishing the previous completion), the task picks the new request up in
# the same run: no work is queued and no kworker is woken (the fast mode, ~24 us in a quiet guest). If
# the task has gone idle first, the post queues work and wakes a kworker, and the READ costs one more
# work item and the wake-ups (the slow mode, ~31 us). Which mode a run settles in is decided by a race
# of a few microseconds: the time from the CQE to the next post against the time the send task keeps
# running after it.
#
# For ib_read_lat, farpool-vm-rdma --lat read (the endpoint) and farbench rdma (the client path), each
# in a long 8 B READ loop, 0.1 s of guest-wide kernel events are recorded: rxe_cq_post (a kprobe), the
# doorbell writes of the measured process, and workqueue execute start/end. Per program it prints the
# posts seen, how many reached a running work item, and the median CQE-to-post time. Outputs:
# /mnt/host/out/rdma-trace-*.txt.
OUT=${FARPOOL_OUT:-/mnt/host/out}
export RUST_BACKTRACE=0
if ! command -v perf >/dev/null; then
  echo "RESULT rdma-trace SKIP perf is not in this guest image (build one with FARPOOL_VM_EXTRA_PKGS=linux-perf)"
  exit 0
fi
DEV=""; GIDX=""
[ -r /run/farpool-rdma ] && read -r DEV GIDX </run/farpool-rdma
if [ -z "$DEV" ]; then
  echo "RESULT rdma-trace FAIL no RDMA device from 00-env (/run/farpool-rdma missing: env-rxe failed?)"
  exit 0
fi
T=/sys/kernel/tracing
[ -d $T/events ] || mount -t tracefs nodev $T 2>/dev/null
# Only 32-byte writes (rxe's doorbell): perf's own writes of the recording stay out of it, and with them
# most of the recording's load on the guest.
EV=(-e syscalls:sys_enter_write --filter 'count == 32' -e workqueue:workqueue_execute_start
  -e workqueue:workqueue_execute_end)
if echo 'p:farpool_cqpost rxe_cq_post' >>$T/kprobe_events 2>/dev/null; then
  EV+=(-e kprobes:farpool_cqpost)
else
  echo "rdma-trace: no kprobe on rxe_cq_post; CQE-to-post times left out"
fi

# Summarize one recording, as `perf script` printed it ($1), for the process named $2. Prints
# "posts during react_median_us".
summarize() {
  awk -v who="$2" '
    {
      t = -1
      for (i = 1; i < NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) { t = substr($i, 1, length($i) - 1) * 1e6; ev = $(i + 1); break }
      if (t < 0) next
      if (ev == "kprobes:farpool_cqpost:") { cq = t; next }
      if (ev == "workqueue:workqueue_execute_start:") { run++; next }
      if (ev == "workqueue:workqueue_execute_end:") { if (run > 0) run--; next }
      if (ev == "syscalls:sys_enter_write:" && $1 == who && $0 ~ /count: 0x0*20$/) {
        posts++; if (run > 0) during++
        if (cq > 0) { print "R", t - cq; cq = 0 }
      }
    }
    END { print "S", posts + 0, during + 0 }' "$1" >/tmp/rdma-trace.sum
  set -- $(awk '$1 == "S" { print $2, $3 }' /tmp/rdma-trace.sum)
  local med
  med=$(awk '$1 == "R" { print $2 }' /tmp/rdma-trace.sum | sort -n | awk '{ v[NR] = $1 } END { if (NR) printf "%.1f", v[int((NR + 1) / 2)]; else print "-" }')
  echo "$1 $2 $med"
}

# Record 0.1 s while the loop started by "$@" (in the background) runs; $1 = name, $2 = comm.
trace() {
  local name=$1 comm=$2; shift 2
  "$@" >/tmp/rdma-trace-run.txt 2>&1 &
  local pid=$!
  sleep 3
  timeout 30 perf record -q -m 1024 -a "${EV[@]}" -o /tmp/rdma-trace.data -- sleep 0.1 >/dev/null 2>&1
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
  perf script --ns -i /tmp/rdma-trace.data -F comm,tid,cpu,time,event,trace >"$OUT/rdma-trace-$name.txt" 2>/dev/null
  set -- $(summarize "$OUT/rdma-trace-$name.txt" "$comm")
  echo "rdma-trace: $name: $1 posts, $2 reached a running rxe work item, CQE-to-post median ${3} us"
  FIG="$FIG; $name $2/$1 posts into a running task, CQE->post ${3} us"
  [ "${1:-0}" -gt 0 ] || BAD="$BAD $name"
}

FIG=""; BAD=""
timeout 60 ib_read_lat -d "$DEV" -x "$GIDX" -s 8 -n 2000000 >/dev/null 2>&1 &
srv=$!
sleep 1.5
trace perftest ib_read_lat timeout 60 ib_read_lat -d "$DEV" -x "$GIDX" -s 8 -n 2000000 127.0.0.1
kill $srv 2>/dev/null; wait $srv 2>/dev/null
trace endpoint farpool-vm-rdma timeout 60 farpool-vm-rdma --device "$DEV" --gid-index "$GIDX" --lat read --size 8 --iters 2000000
trace client farbench timeout 60 farbench rdma --device "$DEV" --gid-index "$GIDX" --no-perftest --rounds 1 \
  --lat-sizes 8 --iters 2000000 --bw-iters 10 --no-check
echo '-:farpool_cqpost' >>$T/kprobe_events 2>/dev/null
if [ -n "$BAD" ]; then
  echo "RESULT rdma-trace FAIL no doorbell writes recorded for:$BAD (see $OUT/rdma-trace-*.txt)"
else
  echo "RESULT rdma-trace PASS figures recorded: ${FIG#; }"
fi
