#!/bin/bash
# Remove what the test guest does not need from a debootstrapped rootfs (docs, locales, apt caches).
# usage: trim-rootfs.sh ROOTFS
set -euo pipefail
R=${1:?usage: trim-rootfs.sh ROOTFS}
[ -d "$R/usr" ] || { echo "trim-rootfs: $R is not a rootfs" >&2; exit 1; }
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/cache/apt/*.bin "$R"/var/lib/apt/lists/* \
       "$R"/usr/share/doc/* "$R"/usr/share/man/* "$R"/usr/share/locale/* "$R"/usr/share/info/* \
       "$R"/usr/share/zoneinfo "$R"/var/cache/debconf/*-old "$R"/var/log/*.log
