#!/usr/bin/env bash
# Install what building and testing farpool needs on a Debian bookworm machine (run as root).
# Idempotent: installs only what is missing. Network: the machine's own Debian mirror.
set -euo pipefail
pkgs=(cmake libclang-dev pkg-config libibverbs-dev ibverbs-providers redis-server bc)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[deps] installing: ${missing[*]}"
  if [ "$(id -u)" != 0 ]; then echo "[deps] need root to apt-get install ${missing[*]}" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "[deps] ok"
