#!/usr/bin/env bash
# make cluster-test: the docker-compose cluster (docker-compose.yml) on a real Docker engine.
#
#  1. installs Debian's docker.io and docker-compose if missing; starts
#     `dockerd --iptables=false --ip-forward=false --bridge=none` (own log and pidfile)
#     when no engine answers, and stops it at the end;
#  2. base image: debian:bookworm-slim if present or pullable, else xlb-base:bookworm,
#     made once with debootstrap and kept (XLB_BASE=IMAGE overrides both);
#  3. builds xlb:latest, brings the cluster up (project "xlbclustertest");
#  4. checks: every node SYNCED through xlbctl and healthy (grpc.health.v1); from the
#     client, TCP and UDP through the VIP via each node reach both backends; node2 stopped:
#     node1 and node3 stay SYNCED and serving, and take a new service; node2 started
#     again: it converges (SYNCED at the new generation) and serves the new service;
#  5. tears down what it made: containers, networks, volumes (docker-compose down -v)
#     and the dockerd it started. Images (base, xlb:latest, build cache) stay cached.
#
# XLB_CLUSTER_KEEP=1 leaves the cluster (and a dockerd it started) running.
set -euo pipefail
cd "$(dirname "$0")/.."

T0=$(date +%s)
log() { printf 'cluster-test: [%3ds] %s\n' $(( $(date +%s) - T0 )) "$*"; }
die() { printf 'cluster-test: FAIL: %s\n' "$*" >&2; exit 1; }

STATE=/var/tmp/xlb-cluster-test          # dockerd log and pidfile, the debootstrap tree
PROJECT=xlbclustertest
VIP=198.19.0.10
KEEP=${XLB_CLUSTER_KEEP:-0}
mkdir -p "$STATE"

elapsed() { echo $(( $(date +%s) - T0 )); }

# -- 1. engine and tools ---------------------------------------------------------------
apt_install() {
  log "installing $*"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -q && apt-get install -y -q --no-install-recommends "$@"; } \
    >"$STATE/apt.log" 2>&1 || { tail -20 "$STATE/apt.log"; die "apt-get install $* failed"; }
}

need=()
command -v dockerd >/dev/null || [ -x /usr/sbin/dockerd ] || need+=(docker.io)
command -v docker-compose >/dev/null || need+=(docker-compose)
((${#need[@]} == 0)) || apt_install "${need[@]}"
# Debian's client matches Debian's engine; another docker on PATH may be newer than it.
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER=$(command -v docker)
compose() { docker-compose -p "$PROJECT" "$@"; }

STARTED_DOCKERD=0
if "$DOCKER" info >/dev/null 2>&1; then
  log "using the running Docker engine"
else
  log "starting dockerd --iptables=false --ip-forward=false --bridge=none (log $STATE/dockerd.log)"
  # No host firewall rules, no host sysctl change, no default bridge: user networks only.
  setsid /usr/sbin/dockerd --iptables=false --ip-forward=false --bridge=none \
    --pidfile "$STATE/dockerd.pid" >"$STATE/dockerd.log" 2>&1 </dev/null &
  STARTED_DOCKERD=1
  for _ in $(seq 1 60); do
    "$DOCKER" info >/dev/null 2>&1 && break
    sleep 0.5
  done
  "$DOCKER" info >/dev/null 2>&1 || die "dockerd did not start; see $STATE/dockerd.log"
fi

stop_dockerd() {
  [ "$STARTED_DOCKERD" = 1 ] || return 0
  local pid
  pid=$(cat "$STATE/dockerd.pid" 2>/dev/null) || return 0
  log "stopping the dockerd it started (pid $pid)"
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "dockerd $pid still running after 30 s"
    return 0
  fi
  # dockerd leaves its own network namespace bind-mounted, and its runtime state.
  if mountpoint -q /run/docker/netns/default 2>/dev/null; then
    umount /run/docker/netns/default
  fi
  rm -rf /run/docker
}

teardown() {
  local rc=$?
  set +e
  if [ "$rc" != 0 ]; then
    compose logs --no-color >"$STATE/cluster.log" 2>&1
    log "failed; the containers, and each one's last log lines (all: $STATE/cluster.log):"
    compose ps 2>&1 | sed 's/^/  /'
    for svc in $(compose config --services 2>/dev/null); do
      compose logs --no-color --tail 8 "$svc" 2>&1 | grep -v '^Attaching' | cut -c1-240 \
        | sed 's/^/  /'
    done
  fi
  if [ "$KEEP" = 1 ]; then
    log "XLB_CLUSTER_KEEP=1: cluster left running (docker-compose -p $PROJECT down -v removes it)"
  else
    log "tearing down (containers, networks, volumes; images stay cached)"
    compose down -v --remove-orphans >/dev/null 2>&1
    left=$("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$PROJECT")
    left+=$("$DOCKER" network ls -q --filter "label=com.docker.compose.project=$PROJECT")
    left+=$("$DOCKER" volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
    [ -z "$left" ] || { log "left behind: $left"; rc=1; }
    stop_dockerd
  fi
  if [ "$rc" = 0 ]; then
    log "passed in $(elapsed) s"
  else
    log "FAILED after $(elapsed) s"
  fi
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# -- 2. base image -----------------------------------------------------------------------
have_image() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

if [ -n "${XLB_BASE:-}" ]; then
  BASE=$XLB_BASE
elif have_image debian:bookworm-slim; then
  BASE=debian:bookworm-slim
elif have_image xlb-base:bookworm; then
  BASE=xlb-base:bookworm
  log "base image xlb-base:bookworm (cached)"
elif timeout 60 "$DOCKER" pull -q debian:bookworm-slim >/dev/null 2>&1; then
  BASE=debian:bookworm-slim
else
  BASE=xlb-base:bookworm
  log "no registry to pull debian:bookworm-slim from: building $BASE with debootstrap"
  command -v debootstrap >/dev/null || apt_install debootstrap
  root="$STATE/rootfs"
  rm -rf "$root"
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian \
    >"$STATE/debootstrap.log" 2>&1 || die "debootstrap failed; see $STATE/debootstrap.log"
  # As debian:bookworm-slim: updates and security sources, no package lists or caches.
  rm -f "$root/etc/apt/sources.list"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" -c . | "$DOCKER" import - "$BASE" >/dev/null
  rm -rf "$root"
  log "base image $BASE built at $(elapsed) s"
fi

# -- 3. image and cluster ------------------------------------------------------------------
# A host behind a TLS-inspecting proxy: pip in the build must trust its CA (build-time only).
extra_ca=""
for crt in /usr/local/share/ca-certificates/*.crt; do
  [ -e "$crt" ] && extra_ca+=$(cat "$crt")$'\n'
done
log "building xlb:latest on $BASE"
t=$(date +%s)
XLB_BASE=$BASE XLB_EXTRA_CA_CERTS=$extra_ca compose build -q policyd >"$STATE/build.log" 2>&1 \
  || { tail -30 "$STATE/build.log"; die "image build failed; see $STATE/build.log"; }
log "image built in $(( $(date +%s) - t )) s"

compose down -v --remove-orphans >/dev/null 2>&1 || true   # a previous run's leftovers
t=$(date +%s)
compose up -d >"$STATE/up.log" 2>&1 || { cat "$STATE/up.log"; die "docker-compose up failed"; }
setup_rc=$(timeout 300 "$DOCKER" wait "$(compose ps -q setup)") || die "the setup job did not end"
[ "$setup_rc" = 0 ] || { compose logs --no-color setup; die "the setup job exited $setup_rc"; }

# -- 4. checks ----------------------------------------------------------------------------
xlbctl() { compose exec -T policyd xlbctl --server 127.0.0.1:50151 "$@"; }

# status_check NODE... : each named node SYNCED at the desired generation (prints them)
status_check() {
  xlbctl status | python3 -c '
import json, sys
want = sys.argv[1:]
status = json.load(sys.stdin)
nodes = {n["node"]: n for n in status["nodes"]}
bad = []
for name in want:
    n = nodes.get(name)
    if n is None:
        bad.append(f"{name}: not registered")
        continue
    line = f"{name} {n['"'"'state'"'"']} observed {n.get('"'"'observed_generation'"'"', 0)}/{status['"'"'generation'"'"']} services {n.get('"'"'services'"'"', 0)}"
    print("  " + line)
    if n["state"] != "SYNC_STATE_SYNCED" or n.get("observed_generation") != status["generation"]:
        bad.append(line)
sys.exit("not synced: " + "; ".join(bad) if bad else 0)
' "$@"
}

wait_synced() {  # wait_synced TIMEOUT NODE...
  local timeout=$1; shift
  for node in "$@"; do
    xlbctl status "$node" --wait --timeout "$timeout" >/dev/null \
      || { xlbctl status "$node" || true; die "$node not SYNCED within $timeout s"; }
  done
  status_check "$@" || die "not every node SYNCED"
}

health_check() {  # containers' grpc.health.v1 checks, as docker reports them
  local svc cid h
  for svc in "$@"; do
    cid=$(compose ps -q "$svc")
    for _ in $(seq 1 120); do
      h=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$cid")
      [ "$h" = healthy ] && break
      sleep 0.5
    done
    [ "$h" = healthy ] || die "$svc is $h"
  done
  log "healthy (grpc.health.v1): $*"
}

# traffic NODE_NUMBER PROTO PORT EXPECTED... : 20 requests from the client address that
# routes via that node; every one answered, and by each expected backend (only by them).
traffic() {
  local n=$1 proto=$2 port=$3; shift 3
  local out
  out=$(compose exec -T client python3 -m lab.client "$proto-who" --vip "$VIP" --port "$port" \
          --count 20 --timeout 2 --source "198.18.10.10$n" 2>/dev/null) || true
  python3 -c '
import json, sys
n, proto, port, out, want = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
try:
    got = json.loads(out)
except ValueError:
    sys.exit(f"via node{n} {proto}/{port}: no result ({out!r})")
answered = {k: v for k, v in got.items() if k != "errors"}
line = f"via node{n} {proto}/{port}: {answered} errors {got.get('"'"'errors'"'"', 0)}"
print("  " + line)
if got.get("errors") or sorted(answered) != sorted(want) or min(answered.values()) == 0:
    sys.exit(f"expected answers from {want} only, none lost: {line}")
' "$n" "$proto" "$port" "$out" "$@"
}

log "cluster up; waiting for every node SYNCED"
wait_synced 180 node1 node2 node3
log "all SYNCED $(( $(date +%s) - t )) s after docker-compose up"
health_check policyd node1 node2 node3

log "requests from the client through the VIP, via each node"
for n in 1 2 3; do
  traffic "$n" tcp 80 be1 be2 || die "traffic"
  traffic "$n" udp 7 be1 be2 || die "traffic"
done

log "stopping node2"
compose stop node2 >/dev/null 2>&1
# A change while node2 is down: node1 and node3 take it, node2 must catch up later.
xlbctl service apply --name web-be1 --vip "$VIP" --port 8080 --protocol tcp \
  --endpoint 198.18.20.101:8080 >/dev/null
wait_synced 30 node1 node3
if status_check node2 >/dev/null 2>&1; then die "node2 reported SYNCED while stopped"; fi
log "  node2 not SYNCED while stopped: $(xlbctl status node2 | python3 -c '
import json, sys; n = json.load(sys.stdin)["nodes"][0]; print(n["state"], n["message"][:60])')"
for n in 1 3; do
  traffic "$n" tcp 80 be1 be2 || die "traffic"
  traffic "$n" udp 7 be1 be2 || die "traffic"
  traffic "$n" tcp 8080 be1 || die "traffic"
done

log "starting node2 again"
t=$(date +%s)
compose start node2 >/dev/null 2>&1
wait_synced 180 node1 node2 node3
log "node2 converged $(( $(date +%s) - t )) s after its start"
health_check node2
traffic 2 tcp 80 be1 be2 || die "traffic"
traffic 2 udp 7 be1 be2 || die "traffic"
traffic 2 tcp 8080 be1 || die "traffic"
