#!/bin/bash
# Boot the farpool test guest under qemu TCG: kernel + initramfs (image base.cpio + guest-init as /init),
# serial console on stdout, power-off at the end. run.sh is the usual entry point; this is the plain boot.
# usage: boot.sh [extra qemu args...]
# env: FARPOOL_VM_DIR   cache with image/ (default /tmp/farpool-vm)
#      SHARE            host dir exported over 9p (tag host0) -> guest /mnt/host
#      TIMEOUT          seconds before qemu is killed (default 1200)
#      MEM (4G; must equal the total of any -numa memdevs passed), SMP (2), CPU (max),
#      MACHINE_OPTS (appended to -M q35), APPEND (extra kernel command line), ACCEL (tcg|kvm)
set -euo pipefail
S=$(cd "$(dirname "$0")" && pwd)
. "$S/lib.sh"
[ -s "$VM_IMG/base.cpio" ] && [ -s "$VM_IMG/vmlinuz" ] || vm_die "no image in $VM_IMG: run tests/vm/build-image.sh"
command -v qemu-system-x86_64 >/dev/null || vm_die "qemu-system-x86_64 missing: run tests/vm/setup-host.sh"
# TCG by default: /dev/kvm here is kvm_pvm (no VMX) and a stock Debian kernel dies in its decompressor.
ACCEL=${ACCEL:-tcg}
if [ "$ACCEL" = kvm ]; then ACC=(-accel kvm -cpu "${CPU:-host}"); else ACC=(-accel tcg,thread=multi -cpu "${CPU:-max}"); fi
WORK=$(mktemp -d "$VM_DIR/boot.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/i" && install -m 755 "$S/guest-init" "$WORK/i/init"
(cd "$WORK/i" && echo init | cpio -o -H newc --quiet) >"$WORK/init.cpio"
cat "$VM_IMG/base.cpio" "$WORK/init.cpio" >"$WORK/initrd"   # a later cpio member overrides an earlier one
TIMEOUT=${TIMEOUT:-1200}
echo "HOST: boot kernel $(cat "$VM_IMG/kernel-version") accel=$ACCEL timeout=${TIMEOUT}s share=${SHARE:-none}"
t0=$(date +%s%N)
set +e
timeout -k 10 "$TIMEOUT" qemu-system-x86_64 "${ACC[@]}" -M "q35${MACHINE_OPTS:-}" -smp "${SMP:-2}" -m "${MEM:-4G}" \
  -kernel "$VM_IMG/vmlinuz" -initrd "$WORK/initrd" \
  -append "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=4 ${APPEND:-}" \
  ${SHARE:+-virtfs local,path=$SHARE,mount_tag=host0,security_model=none,id=host0} \
  -display none -nodefaults -serial stdio -monitor none -no-reboot "$@" </dev/null
rc=$?
set -e
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
[ $rc = 124 ] && echo "HOST: TIMEOUT qemu killed after ${TIMEOUT}s"
echo "HOST: qemu rc=$rc wall=$((ms / 1000)).$(printf %03d $((ms % 1000)))s"
exit $rc
