# shellcheck shell=bash disable=SC2034
# Sourced by the host-side scripts of the VM harness (not executable on its own).
# Defines: VM_DIR (cache), VM_IMG (built image), mirror detection, private apt options, a step timer.
VM_DIR=${FARPOOL_VM_DIR:-/tmp/farpool-vm}
VM_IMG=$VM_DIR/image
VM_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

vm_has_lists() { # vm_has_lists NAME SUITE: private apt lists hold SUITE's main Packages index
  compgen -G "$VM_DIR/$1/lists/*_dists_$2_main_binary-amd64_Packages*" >/dev/null
}
vm_die() { echo "vm: ERROR: $*" >&2; exit 1; }

# All "deb" URIs of this machine's apt sources (deb822 *.sources and one-line *.list), in order.
vm_apt_uris() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] && awk '/^URIs:/{for (i = 2; i <= NF; i++) print $i}' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] && sed -nE 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p' "$f"
  done
}

# The Debian mirror this machine already uses (never hard-coded). FARPOOL_VM_MIRROR overrides.
vm_mirror() {
  local m=${FARPOOL_VM_MIRROR:-}
  [ -n "$m" ] || m=$(vm_apt_uris | grep -E '^(https?|file):' | grep -v -- '-security' | head -1)
  [ -n "$m" ] || vm_die "no Debian mirror found in /etc/apt/sources.list{,.d/*}; set FARPOOL_VM_MIRROR"
  echo "${m%/}"
}
vm_security_mirror() {
  local s=${FARPOOL_VM_SECURITY_MIRROR:-}
  [ -n "$s" ] || s=$(vm_apt_uris | grep -E '^(https?|file):' | grep -- '-security' | head -1)
  [ -n "$s" ] || s="$(vm_mirror | sed 's,/debian$,,')/debian-security"
  echo "${s%/}"
}

# Private apt state: nothing in /etc/apt or /var/lib/apt/lists changes.
#   $VM_DIR/apt         bookworm + bookworm-backports (host packages: qemu 10)
#   $VM_DIR/apt-trixie  trixie (only to download the guest kernel .deb)
vm_apt_opts() { # vm_apt_opts NAME
  local d=$VM_DIR/$1
  echo "-o Dir::Etc::SourceList=$d/sources.list -o Dir::Etc::SourceParts=/nonexistent" \
       "-o Dir::State::Lists=$d/lists -o Dir::Cache=$d/cache" \
       "-o Acquire::http::Timeout=30 -o Acquire::https::Timeout=30 -o Acquire::Retries=2" \
       "-o DPkg::Lock::Timeout=300 -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
}

# Step timer: vm_step "what" prints "[tag HH:MM:SS +Ns] what" (N = seconds since vm_timer_start).
vm_timer_start() { VM_T0=$(date +%s); VM_TS=$VM_T0; VM_TAG=$1; }
vm_step() {
  local now; now=$(date +%s)
  [ -n "${VM_STEP:-}" ] && echo "[$VM_TAG] step '$VM_STEP' took $((now - VM_TS))s"
  VM_TS=$now; VM_STEP=$1
  [ -n "$1" ] && echo "[$VM_TAG $(date +%T) +$((now - VM_T0))s] $1"
  return 0
}
