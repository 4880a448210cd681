#!/usr/bin/env bash
# Idempotent set-up of everything xlb needs on a Debian bookworm machine (as root):
# apt packages, the kernel-headers link bcc needs, a venv that sees Debian's bcc,
# the Python dependencies and the generated gRPC code.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(python3-bpfcc python3-venv linux-headers-amd64 iproute2 bpftool libbpf1
          iptables nftables nginx-light wrk make procps iputils-ping
          etcd-server etcd-client)  # etcd: policyd replicas (docs/ha.md) and their tests

log() { printf 'setup: %s\n' "$*"; }

missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# bcc needs /lib/modules/$(uname -r)/build. Kernels without their own headers get
# Debian's linux-headers-<arch>: the programs only use UAPI-level definitions.
kmod="/lib/modules/$(uname -r)"
if [ ! -e "$kmod/build/include" ]; then
  arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  [ -n "$arch_dir" ] && [ -n "$common_dir" ] || { log "no linux headers under /usr/src"; exit 1; }
  log "linking $kmod/build -> $arch_dir"
  mkdir -p "$kmod"
  ln -sfn "$arch_dir" "$kmod/build"
  [ -e "$kmod/source" ] || ln -sfn "$common_dir" "$kmod/source"
fi

if [ ! -x .venv/bin/python ]; then
  log "creating venv (.venv, with system site packages for bcc)"
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -c 'import bcc' || { log "bcc not importable from the venv"; exit 1; }

stamp=.venv/.deps-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -e "$stamp" ]; then
  log "installing Python dependencies"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q grpcio-tools
  rm -f .venv/.deps-*
  touch "$stamp.pending"
fi

log "generating gRPC code from proto/"
.venv/bin/python -m scripts.gen_proto

if [ -e "$stamp.pending" ]; then
  .venv/bin/pip install -q --config-settings editable_mode=compat -e '.[test]'
  mv "$stamp.pending" "$stamp"
fi
log "done"
