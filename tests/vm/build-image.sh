#!/bin/bash
# Build the guest image: Debian trixie kernel 6.12 (rdma_rxe, CXL, dax, 9p modules) + a trixie minbase
# userland with what the suites need, packed as one uncompressed initramfs. Run setup-host.sh first.
# usage: build-image.sh            env: FARPOOL_VM_DIR (cache, default /tmp/farpool-vm),
#                                       FORCE=1 (rebuild even if up to date),
#                                       FARPOOL_VM_EXTRA_PKGS="pkg1,pkg2" (more guest packages)
# output: $FARPOOL_VM_DIR/image/{vmlinuz,base.cpio,kernel-version,stamp}
# Skips the build when a complete image built from the same inputs (these scripts, memtest.c, the
# package list) exists. /init is not in the image: boot.sh appends guest-init at each boot.
set -euo pipefail
S=$(cd "$(dirname "$0")" && pwd)
. "$S/lib.sh"
# guest packages: RDMA (verbs, rxe provider, perftest, ibv_devices), NUMA, CXL/dax tools, basics.
# glibc and libgcc-s1 come with minbase (host-built Rust binaries need them; trixie glibc >= bookworm's).
PKGS=rdma-core,ibverbs-providers,libibverbs1,ibverbs-utils,perftest,numactl,ndctl,daxctl,cxl,iproute2,procps,kmod,pciutils,libgcc-s1
[ -n "${FARPOOL_VM_EXTRA_PKGS:-}" ] && PKGS="$PKGS,$FARPOOL_VM_EXTRA_PKGS"

[ "$(id -u)" = 0 ] || vm_die "build-image.sh must run as root (debootstrap, chroot)"
mkdir -p "$VM_DIR"
exec 9>"$VM_DIR/build.lock"
flock -w 1800 9 || vm_die "another build-image.sh holds $VM_DIR/build.lock"

STAMP=$(cat "$S/build-image.sh" "$S/install-modules.sh" "$S/trim-rootfs.sh" "$S/memtest.c" \
        <(echo "$PKGS") | sha256sum | cut -d' ' -f1)
if [ "${FORCE:-0}" != 1 ] && [ -s "$VM_IMG/base.cpio" ] && [ -s "$VM_IMG/vmlinuz" ] \
   && [ "$(cat "$VM_IMG/stamp" 2>/dev/null)" = "$STAMP" ]; then
  echo "vm: image up to date in $VM_IMG (kernel $(cat "$VM_IMG/kernel-version")); FORCE=1 rebuilds"
  exit 0
fi

MIRROR=$(vm_mirror)
TRX=$(vm_apt_opts apt-trixie)
vm_has_lists apt-trixie trixie || vm_die "no trixie apt lists in $VM_DIR/apt-trixie: run tests/vm/setup-host.sh first"
command -v debootstrap >/dev/null || vm_die "debootstrap missing: run tests/vm/setup-host.sh first"
B=$VM_DIR/image.new
rm -rf "$B"; mkdir -p "$B/debs"
vm_timer_start build
echo "vm: building image in $B from $MIRROR"

vm_step "download trixie kernel .deb"
KPKG=$(apt-cache $TRX depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$KPKG" ] || vm_die "cannot resolve linux-image-amd64 in the trixie lists"
(cd "$B/debs" && timeout 900 apt-get $TRX download -q "$KPKG" 2>&1 | grep -v unsandboxed) || true
ls "$B"/debs/"${KPKG}"_*.deb >/dev/null 2>&1 || vm_die "download of $KPKG failed (mirror $MIRROR)"
mkdir "$B/kernel" && dpkg-deb -x "$B"/debs/"${KPKG}"_*.deb "$B/kernel"
KVER=$(ls "$B/kernel/boot" | sed -n 's/^vmlinuz-//p' | head -1)
echo "vm: kernel $KVER"

echo "vm: guest packages: $PKGS"
vm_step "debootstrap trixie minbase"
timeout 1800 debootstrap --variant=minbase --include="$PKGS" trixie "$B/rootfs" "$MIRROR" \
  >"$B/debootstrap.log" 2>&1 || { tail -20 "$B/debootstrap.log"; vm_die "debootstrap failed (log $B/debootstrap.log)"; }

vm_step "trim rootfs, install modules, memtest"
"$S/trim-rootfs.sh" "$B/rootfs"
"$S/install-modules.sh" "$B/kernel" "$B/rootfs"
gcc -O2 -static -o "$B/rootfs/usr/local/bin/memtest" "$S/memtest.c"
mkdir -p "$B/rootfs/mnt/host"

vm_step "pack initramfs"
(cd "$B/rootfs" && find . -xdev | cpio -o -H newc --quiet) > "$B/base.cpio"
cp "$B/kernel/boot/vmlinuz-$KVER" "$B/vmlinuz"
echo "$KVER" > "$B/kernel-version"
echo "vm: rootfs $(du -sh "$B/rootfs" | cut -f1), base.cpio $(du -sh "$B/base.cpio" | cut -f1)"
rm -rf "$B/rootfs" "$B/kernel" "$B/debs"
echo "$STAMP" > "$B/stamp"
rm -rf "$VM_IMG"; mv "$B" "$VM_IMG"
vm_step ""
echo "vm: image built in $(( $(date +%s) - VM_T0 ))s: $VM_IMG"
