#!/bin/bash
# Copy only the kernel modules the guest needs (plus their dependency closure) from an extracted kernel
# .deb into the rootfs, then run the guest's depmod.
# usage: install-modules.sh KERNEL_EXTRACT_DIR ROOTFS
# Pitfalls: the .deb has no modules.dep (depmod runs in its postinst), so one is made with the guest's
# depmod in a chroot; rdma_rxe needs the crc32 crypto modules (kernel/crypto, arch/x86/crypto), or
# `rdma link add` fails with "No such file or directory".
set -euo pipefail
K=${1:?usage: install-modules.sh KERNEL_DIR ROOTFS}; R=${2:?usage: install-modules.sh KERNEL_DIR ROOTFS}
KVER=$(ls "$K/boot" | sed -n 's/^vmlinuz-//p' | head -1)
[ -n "$KVER" ] || { echo "install-modules: no vmlinuz-* in $K/boot" >&2; exit 1; }
SRC=$K/usr/lib/modules/$KVER; DST=$R/usr/lib/modules/$KVER
if [ ! -e "$SRC/modules.dep" ]; then
  rm -rf "$DST"; mkdir -p "$(dirname "$DST")"; cp -a "$SRC" "$DST"
  chroot "$R" depmod "$KVER"; cp "$DST/modules.dep" "$SRC/"
fi
rm -rf "$DST"; mkdir -p "$DST"
cp "$SRC"/modules.order "$SRC"/modules.builtin* "$DST"/ 2>/dev/null || true
# whole subsystems that matter: RDMA (rdma_rxe, ib_uverbs), CXL, dax (device_dax, kmem), nvdimm, crypto
# (crc32 for rxe), 9p over virtio (host share), qemu_fw_cfg
(cd "$SRC" && find kernel/drivers/infiniband kernel/drivers/cxl kernel/drivers/dax kernel/drivers/nvdimm \
   kernel/drivers/acpi/nfit kernel/crypto kernel/arch/x86/crypto kernel/drivers/net/dummy.ko* \
   kernel/drivers/net/veth.ko* kernel/drivers/firmware/qemu_fw_cfg.ko* kernel/fs/9p \
   kernel/net/9p/9pnet.ko* kernel/net/9p/9pnet_virtio.ko* -name '*.ko*' 2>/dev/null \
   | cpio -pdm --quiet "$DST")
# dependency closure from the full tree's modules.dep (3 rounds cover the depth we have)
for _ in 1 2 3; do
  (cd "$DST" && find kernel -name '*.ko*') | while read -r f; do
    grep "^$f:" "$SRC/modules.dep" | cut -d: -f2 | tr ' ' '\n' | grep . || true
  done | sort -u | while read -r d; do
    [ -e "$DST/$d" ] || (cd "$SRC" && echo "$d" | cpio -pdm --quiet "$DST")
  done
done
chroot "$R" depmod "$KVER"
echo "install-modules: $KVER, $(find "$DST" -name '*.ko*' | wc -l) modules, $(du -sh "$DST" | cut -f1)"
