# vm-timeout: 400
# CXL / NUMA checks of farpool-cxl and farpool-memserver (state from 00-env: CPU-less node 1, devdax
# device named in /run/farpool-dax). Kept to a few MiB: emulated CXL runs at ~25 MiB/s.
#   cxl-topology      discovery sees CPU-less node 1 (a far-memory candidate) and the dax device
#   cxl-numa-backing  the numa:1 backing (library) puts every page on node 1 and round-trips data
#   cxl-dax-backing   the dax backing (library) maps the device with 2 MiB alignment and round-trips data
#   cxl-numa-server   farpool-memserver --backing numa:1: its log reports every sampled page on node 1,
#                     a client writes/reads back through it over tcp and over shm (the per-grant memfd's
#                     pages, seen from the client's mapping, all on node 1), and `farpool-memserver topology` reports node 1 as CPU-less
#   cxl-dax-server    farpool-memserver --backing dax:/dev/daxX.Y serves a client that writes and reads back
OUT=${FARPOOL_OUT:-/mnt/host/out}
V=farpool-vm-cxl
DAX=""; [ -r /run/farpool-dax ] && read -r DAX </run/farpool-dax
run() { # run NAME CMD...: RESULT NAME PASS iff CMD exits 0; output kept in $OUT/cxl-NAME.txt
  local name=$1; shift
  local out rc; out=$(timeout 120 "$@" 2>&1); rc=$?
  echo "$out" | grep -v -E '^\s+(at |[0-9]+: )' | tail -25; echo "$out" >"$OUT/$name.txt" 2>/dev/null
  [ $rc = 0 ] && echo "RESULT $name PASS" || echo "RESULT $name FAIL exit $rc: $(echo "$out" | grep -m1 -E '^Error' )"
}
if ! command -v $V >/dev/null; then
  for t in topology numa-backing dax-backing numa-server dax-server; do echo "RESULT cxl-$t FAIL $V not in /mnt/host/bin"; done
  exit 0
fi
export RUST_BACKTRACE=0
if [ -n "$DAX" ]; then run cxl-topology $V topology --cpuless 1 --dax "$DAX"
else $V topology; echo "RESULT cxl-topology FAIL no dax device from 00-env (/run/farpool-dax)"; fi
run cxl-numa-backing $V numa 1 8MiB
if [ -n "$DAX" ]; then run cxl-dax-backing $V dax "$DAX" 4MiB
else echo "RESULT cxl-dax-backing FAIL no dax device from 00-env"; fi

# --- through the memory server ----------------------------------------------------------------------
server() { # server PORT BACKING LOG: start farpool-memserver, wait (bounded) until it listens
  farpool-memserver --listen 127.0.0.1:$1 --capacity 8MiB --slab-size 2MiB --backing "$2" --log info >"$3" 2>&1 &
  SPID=$!
  for _ in $(seq 300); do
    grep -q 'farpool-memserver listening' "$3" && return 0
    kill -0 $SPID 2>/dev/null || return 1
    sleep 0.2
  done
  return 1
}
stop() { kill -TERM $SPID 2>/dev/null; for _ in $(seq 50); do kill -0 $SPID 2>/dev/null || break; sleep 0.1; done; kill -KILL $SPID 2>/dev/null; wait $SPID 2>/dev/null; }
if ! command -v farpool-memserver >/dev/null; then
  echo "RESULT cxl-numa-server FAIL farpool-memserver not in /mnt/host/bin"
  echo "RESULT cxl-dax-server FAIL farpool-memserver not in /mnt/host/bin"
  exit 0
fi
L=/tmp/memserver-numa.log; why=""
if server 7311 numa:1 $L; then
  line=$(grep -m1 -o 'numa placement: [0-9]*/[0-9]* sampled pages on node 1[^"]*' $L); echo "server: $line"
  n=${line#numa placement: }; n=${n%% *}
  [ -n "$line" ] && [ "${n%/*}" = "${n#*/}" ] && [ "${n%/*}" -gt 0 ] || why="server log has no full placement on node 1: '${line:-none}'"
  for mode in tcp "shm 1"; do
    out=$(timeout 60 $V client 127.0.0.1:7311 1MiB $mode 2>&1) || why="${why:+$why; }$mode client failed: $(echo "$out" | grep -m1 Error)"
    echo "$out" | head -3
  done
  topo=$(farpool-memserver topology 2>&1); echo "$topo" | grep 'node 1'
  case $topo in *"node 1: no CPUs"*) ;; *) why="${why:+$why; }farpool-memserver topology does not show node 1 CPU-less" ;; esac
else why="server did not start: $(tail -3 $L)"; fi
stop; cp $L "$OUT/" 2>/dev/null
[ -z "$why" ] && echo "RESULT cxl-numa-server PASS" || echo "RESULT cxl-numa-server FAIL $why"

L=/tmp/memserver-dax.log; why=""
if [ -z "$DAX" ]; then why="no dax device from 00-env"
elif server 7312 "dax:$DAX" $L; then
  out=$(timeout 120 $V client 127.0.0.1:7312 1MiB tcp 2>&1) || why="client failed: $(echo "$out" | grep -m1 Error)"
  echo "$out" | head -3
  grep -m1 -o "mapped dax [^\"]*" $L
else why="server did not start: $(tail -3 $L)"; fi
stop; cp $L "$OUT/" 2>/dev/null
[ -z "$why" ] && echo "RESULT cxl-dax-server PASS" || echo "RESULT cxl-dax-server FAIL $why"
