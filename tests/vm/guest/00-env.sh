# vm-timeout: 300
# Harness self-checks, and the state later suites rely on (it stays up for the whole boot):
#   env-rxe   Soft-RoCE device rxe_lo on the guest's lo, port ACTIVE, GID index 1 = ::ffff:127.0.0.1;
#             "rxe_lo 1" (device, GID index) written to /run/farpool-rdma
#   env-numa  node 1 has memory and no CPUs, and memory bound to it lands there (HMAT values shown)
#   env-cxl   CXL type-3 -> region -> dax device in devdax mode, mmap write/read-back checked;
#             its path (e.g. /dev/dax0.0) written to /run/farpool-dax
# Lean on purpose: every process start is slow under TCG.

# --- env-rxe ---------------------------------------------------------------------------------------
why=""
modprobe -a rdma_rxe ib_uverbs || why="modprobe rdma_rxe ib_uverbs failed"
[ -z "$why" ] && { rdma link add rxe_lo type rxe netdev lo || why="rdma link add rxe_lo failed"; }
D=/sys/class/infiniband/rxe_lo/ports/1
if [ -z "$why" ]; then
  devs=$(ibv_devices); echo "$devs"
  gid=""; read -r gid <$D/gids/1; state=""; read -r state <$D/state
  echo "rxe_lo: port state '$state', gid[1] $gid"
  case $devs in *rxe_lo*) ;; *) why="ibv_devices does not list rxe_lo" ;; esac
  [ "$gid" = 0000:0000:0000:0000:0000:ffff:7f00:0001 ] || why="${why:+$why; }GID index 1 is '$gid', not ::ffff:127.0.0.1"
  case $state in *ACTIVE*) ;; *) why="${why:+$why; }port 1 state '$state'" ;; esac
fi
if [ -z "$why" ]; then echo "rxe_lo 1" >/run/farpool-rdma; echo "RESULT env-rxe PASS"
else dmesg | grep -iE 'rxe|infiniband' | tail -5; echo "RESULT env-rxe FAIL $why"; fi

# --- env-numa --------------------------------------------------------------------------------------
why=""; N=/sys/devices/system/node
cpus="?"; read -r cpus <$N/node1/cpulist
mem=$(sed -n 's/^Node 1 MemTotal: *\([0-9]*\) kB/\1/p' $N/node1/meminfo)
hmat=""; for f in read_latency read_bandwidth; do v=""; read -r v <$N/node1/access0/initiators/$f 2>/dev/null; hmat="$hmat $f=${v:-none}"; done
echo "numa: has_cpu=$(<$N/has_cpu) has_memory=$(<$N/has_memory) node1 cpus='$cpus' MemTotal=${mem:-0}kB hmat(node1):$hmat"
[ -z "$cpus" ] || why="node1 has CPUs '$cpus'"
[ "${mem:-0}" -gt 0 ] || why="${why:+$why; }node1 has no memory"
out=$(numactl --membind=1 memtest anon 16 2>&1); echo "$out"
case $out in *"pages per node: node1=4096"*) ;; *) why="${why:+$why; }memory bound to node1 not on node1" ;; esac
case $out in *"-> OK"*) ;; *) why="${why:+$why; }memtest anon on node1 failed" ;; esac
[ -z "$why" ] && echo "RESULT env-numa PASS" || echo "RESULT env-numa FAIL $why"

# --- env-cxl ---------------------------------------------------------------------------------------
# Pitfalls: keep new memory offline (auto_online_blocks) before create-region, or the devdax/system-ram
# switch fails; qemu runs with -cpu ...,hypervisor=off or the region commit fails.
why=""; DAX=""
modprobe -a cxl_acpi cxl_pci cxl_mem dax_cxl device_dax kmem || why="modprobe cxl/dax modules failed"
for _ in $(seq 50); do
  MEM=$(cxl list -M 2>/dev/null | sed -n 's/.*"memdev":"\(mem[0-9]*\)".*/\1/p' | head -1)
  [ -n "$MEM" ] && break; sleep 0.2
done
RD=$(cxl list -D -d root 2>/dev/null | sed -n 's/.*"decoder":"\(decoder[0-9.]*\)".*/\1/p' | head -1)
echo "cxl: root decoder=${RD:-none} memdev=${MEM:-none}"
if [ -z "$why" ] && [ -n "$RD" ] && [ -n "$MEM" ]; then
  echo offline >/sys/devices/system/memory/auto_online_blocks
  cxl create-region -d "$RD" -t ram -m "$MEM" -w 1 || why="cxl create-region failed"
  DAX=$(daxctl list 2>/dev/null | sed -n 's/.*"chardev":"\(dax[0-9.]*\)".*/\1/p' | head -1)
  [ -n "$DAX" ] || why="${why:+$why; }no dax device after create-region"
else
  why="${why:+$why; }no CXL root decoder or memdev"
fi
if [ -z "$why" ]; then
  daxctl reconfigure-device --mode=devdax "$DAX" >/dev/null 2>&1 || why="daxctl reconfigure-device --mode=devdax $DAX failed"
  info=$(daxctl list -d "$DAX"); echo "$info"
  case $info in *'"mode":"devdax"'*) ;; *) why="${why:+$why; }$DAX not in devdax mode" ;; esac
  out=$(memtest dax /dev/"$DAX" 8 2>&1); echo "$out"
  [ "$(grep -c -- '-> OK' <<<"$out")" = 2 ] || why="${why:+$why; }mmap write/read-back on /dev/$DAX failed"
fi
if [ -z "$why" ]; then echo "/dev/$DAX" >/run/farpool-dax; echo "dax device: /dev/$DAX"; echo "RESULT env-cxl PASS"
else dmesg | grep -iE 'cxl|dax' | tail -8; echo "RESULT env-cxl FAIL $why"; fi
