# vm-timeout: 400
# perftest on Soft-RoCE (rxe_lo, set up by 00-env): server and client in this guest over 127.0.0.1,
# GID index 1. Client outputs go to /mnt/host/out/perftest-<name>.txt (names below): the reference the RDMA bench
# compares against in the same boot (timings under TCG are only meaningful as ratios within one boot).
# The recipe's three runs (default sizes: 2 B reads, 64 KiB bw, 8 B atomics), plus ib_read_lat at 8 KiB
# (a page) -> perftest-ib_read_lat-8k.txt.
D=rxe_lo; OUT=/mnt/host/out
listening() { grep -qsE ':4853 [0-9A-F]+:0000 0A' /proc/net/tcp /proc/net/tcp6; }   # port 18515
pt() { # pt NAME TOOL ARGS...: one server + one client run, prints the RESULT line for NAME
  local name=$1 tool=$2 why=""; shift 2
  echo "----- $tool -d $D -x 1 $* (uptime $(cut -d' ' -f1 /proc/uptime))"
  timeout 120 "$tool" -d $D -x 1 "$@" >/tmp/$tool.srv 2>&1 &
  local spid=$!
  for _ in $(seq 150); do listening && break; sleep 0.2; done
  timeout 120 "$tool" -d $D -x 1 "$@" 127.0.0.1 >/tmp/$tool.cli 2>&1; local crc=$?
  wait $spid; local src=$?
  grep -v -E '^\s*$' /tmp/$tool.cli; cp /tmp/$tool.cli "$OUT/perftest-$name.txt" 2>/dev/null
  [ $crc = 0 ] || why="client exit $crc"
  [ $src = 0 ] || { why="${why:+$why, }server exit $src"; cat /tmp/$tool.srv; }
  [ -z "$why" ] && echo "RESULT perftest-$name PASS" || echo "RESULT perftest-$name FAIL $why"
}
if [ ! -e /sys/class/infiniband/$D ]; then
  for t in ib_read_lat ib_read_bw ib_atomic_lat ib_read_lat-8k; do echo "RESULT perftest-$t FAIL no $D device (00-env failed?)"; done
  exit 0
fi
pt ib_read_lat ib_read_lat -n 1000
pt ib_read_bw ib_read_bw -n 1000
pt ib_atomic_lat ib_atomic_lat -n 1000
pt ib_read_lat-8k ib_read_lat -n 1000 -s 8192
