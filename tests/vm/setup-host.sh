#!/bin/bash
# Host prerequisites for the VM harness (Debian bookworm host, root): qemu-system-x86 10.x from
# bookworm-backports (the CXL type-3 volatile-memdev needs qemu >= 8), debootstrap, cpio, gcc (static
# memtest). Uses private apt lists under $FARPOOL_VM_DIR/apt*: nothing in /etc/apt changes. The mirror
# is the one this machine's apt sources already use. Also fetches the trixie lists build-image.sh needs.
# Fails (exit != 0) if the mirror cannot be reached: never pretends.
set -euo pipefail
S=$(cd "$(dirname "$0")" && pwd)
. "$S/lib.sh"
[ "$(id -u)" = 0 ] || vm_die "setup-host.sh must run as root (apt-get install, debootstrap)"
vm_timer_start setup
MIRROR=$(vm_mirror); SEC=$(vm_security_mirror)
echo "vm: mirror $MIRROR (security $SEC), cache $VM_DIR"
[ -r "$VM_KEYRING" ] || vm_die "missing $VM_KEYRING (package debian-archive-keyring)"
for d in apt apt-trixie; do mkdir -p "$VM_DIR/$d/lists/partial" "$VM_DIR/$d/cache/archives/partial"; done
cat > "$VM_DIR/apt/sources.list" <<EOT
deb [signed-by=$VM_KEYRING] $MIRROR bookworm main
deb [signed-by=$VM_KEYRING] $MIRROR bookworm-updates main
deb [signed-by=$VM_KEYRING] $SEC bookworm-security main
deb [signed-by=$VM_KEYRING] $MIRROR bookworm-backports main
EOT
echo "deb [signed-by=$VM_KEYRING] $MIRROR trixie main" > "$VM_DIR/apt-trixie/sources.list"
BPO=$(vm_apt_opts apt); TRX=$(vm_apt_opts apt-trixie)

vm_step "apt-get update (bookworm + backports, trixie; private lists)"
# A plain `apt-get update` exits 0 when the mirror is unreachable (it only warns and keeps old lists):
# --error-on=any makes any failed fetch an error, and the output is checked as well.
apt_update() { # apt_update NAME OPTS
  local out=$VM_DIR/$1/update.log rc=0
  timeout 600 apt-get $2 update -q --error-on=any >"$out" 2>&1 || rc=$?
  cat "$out"
  if [ $rc != 0 ] || grep -qE '^(W|E): .*(Failed to fetch|failed to download|Could not|Unable to)' "$out"; then
    vm_die "apt-get update ($1) failed (rc=$rc): mirror $MIRROR unreachable? see $out"
  fi
}
apt_update apt "$BPO"
apt_update apt-trixie "$TRX"
vm_has_lists apt bookworm-backports || vm_die "no bookworm-backports index after apt-get update"
vm_has_lists apt-trixie trixie || vm_die "no trixie index after apt-get update"

vm_step "apt-get install qemu-system-x86 (backports), debootstrap, cpio, gcc"
DEBIAN_FRONTEND=noninteractive timeout 1200 apt-get $BPO install -y -q --no-install-recommends \
  -t bookworm-backports qemu-system-x86 debootstrap cpio gcc libc6-dev >"$VM_DIR/setup-apt.log" 2>&1 \
  || { tail -20 "$VM_DIR/setup-apt.log"; vm_die "apt-get install failed (log: $VM_DIR/setup-apt.log)"; }

vm_step "check"
V=$(qemu-system-x86_64 --version | head -1)
echo "vm: $V"
MAJ=$(echo "$V" | sed -nE 's/.*version ([0-9]+)\..*/\1/p')
[ "${MAJ:-0}" -ge 8 ] || vm_die "qemu >= 8 needed for cxl-type3 volatile-memdev, have: $V"
for t in debootstrap cpio gcc flock; do command -v $t >/dev/null || vm_die "$t missing after install"; done
vm_step ""
echo "vm: setup-host done in $(( $(date +%s) - VM_T0 ))s"
