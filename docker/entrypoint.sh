#!/bin/sh
# xlb image entrypoint: make the kernel headers bcc needs reachable, then run the command
# (xlb-dpd, xlb-policyd, xlbctl, python3 -m lab.servers ...).
#
# bcc compiles dpd's programs against /lib/modules/$(uname -r)/build. A container sees
# the host's kernel but not its /lib/modules, so unless the host's headers are mounted
# there (-v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro, which wins when it
# has them), link the image's Debian headers (linux-headers-amd64): the datapath uses
# only UAPI-level definitions, which any recent kernel's headers provide.
set -eu
log() { printf 'xlb-entrypoint: %s\n' "$*" >&2; }

kmod="/lib/modules/$(uname -r)"
if [ ! -e "$kmod/build/include" ]; then
  arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$arch_dir" ]; then
    log "no kernel headers for $(uname -r) and none in the image; bcc cannot compile"
  elif mkdir -p "$kmod" 2>/dev/null && ln -sfn "$arch_dir" "$kmod/build" 2>/dev/null; then
    [ -e "$kmod/source" ] || ln -sfn "$common_dir" "$kmod/source"
    [ "${1:-}" != xlb-dpd ] || log "linked $kmod/build -> $arch_dir"
  else
    log "cannot link $kmod/build (read-only /lib/modules?); bcc may not compile"
  fi
fi
exec "$@"
