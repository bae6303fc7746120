#!/usr/bin/env bash
# Build fmc / fmc-train where no image registry is reachable: a Docker daemon started
# by hand when none answers, the local stand-in base, then ./build.sh on top of it.
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
usage: ./build-offline.sh [fmc|fmc-train ...] [--stop]

For machines without registry access (docs/containers.md, "Without registry access"):
  1. uses the Docker daemon that answers; else (root) starts one by hand with
     dockerd --storage-driver=vfs --iptables=false --bridge=none (docker.io from apt
     when missing), socket $FMC_DOCKER_HOST, left running for ./test.sh
  2. makes the stand-in base with tests/container/make_base_image.sh (debootstrap
     bookworm + python + the CPU torch 2.13.0 wheel, `docker import`; cached by tag)
  3. runs ./build.sh with BASE_IMAGE=<stand-in> DOCKER_BUILD_ARGS="--network host"
     (pip reaches the package index through the host's network)
Then it prints the ./test.sh command that runs the image without rebuilding it.
The stand-in has no CUDA: images built on it run on the CPU only.

  fmc, fmc-train   images to build (default: both), as ./build.sh takes them
  --stop           stop a daemon this script started earlier, and exit
  -h, --help       this text

Environment:
  FMC_DOCKER_HOST      socket of the hand-started daemon (default: unix:///run/fmc-docker/docker.sock)
  FMC_CONTAINER_CACHE  daemon data and logs (default: ${XDG_CACHE_HOME:-~/.cache}/fmc/container)
EOF_USAGE
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RUN_DIR=/run/fmc-docker
OWN_HOST=${FMC_DOCKER_HOST:-unix://$RUN_DIR/docker.sock}
CACHE=${FMC_CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fmc/container}
targets=()
STOP=0
while [ $# -gt 0 ]; do
  case "$1" in
    fmc | inference | fmc-train | train) targets+=("$1") ;;
    --stop) STOP=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "build-offline.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

say() { echo "[build-offline] $*" >&2; }

if [ "$STOP" = 1 ]; then
  if [ -f "$RUN_DIR/dockerd.pid" ]; then
    pid=$(cat "$RUN_DIR/dockerd.pid")
    say "stopping dockerd (pid $pid)"
    kill "$pid" 2>/dev/null || true
  else
    say "no daemon started by this script"
  fi
  exit 0
fi

if docker info >/dev/null 2>&1; then
  say "using the running Docker daemon"
elif DOCKER_HOST=$OWN_HOST docker info >/dev/null 2>&1; then
  export DOCKER_HOST=$OWN_HOST
  say "using the daemon started earlier on $DOCKER_HOST"
else
  [ "$(id -u)" = 0 ] || { say "no Docker daemon answers, and starting one needs root"; exit 1; }
  if ! command -v dockerd >/dev/null; then
    say "installing docker.io (Debian)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
  fi
  mkdir -p "$RUN_DIR" "$CACHE"
  say "starting dockerd (vfs; log $CACHE/dockerd-vfs.log)"
  nohup dockerd --storage-driver=vfs --iptables=false --bridge=none \
    --data-root="$CACHE/docker-vfs" --exec-root="$RUN_DIR/exec" \
    --pidfile="$RUN_DIR/dockerd.pid" --host="$OWN_HOST" >>"$CACHE/dockerd-vfs.log" 2>&1 &
  export DOCKER_HOST=$OWN_HOST
  for _ in $(seq 240); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { say "dockerd did not answer; see $CACHE/dockerd-vfs.log"; exit 1; }
fi

if [ "$(id -u)" != 0 ] && ! docker image inspect "$(bash "$ROOT/tests/container/make_base_image.sh" --tag-only)" >/dev/null 2>&1; then
  say "the stand-in base is not built yet and debootstrap needs root"
  exit 1
fi
if [ "$(id -u)" = 0 ] && ! command -v debootstrap >/dev/null; then
  say "installing debootstrap (Debian)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi
base=$(bash "$ROOT/tests/container/make_base_image.sh" | tail -n 1)
say "stand-in base: $base"

export BASE_IMAGE=$base
export DOCKER_BUILD_ARGS="--network host"
"$ROOT/build.sh" "${targets[@]}"

host_note=""
[ -n "${DOCKER_HOST:-}" ] && host_note="DOCKER_HOST=$DOCKER_HOST "
say "built. Run the inference image without a rebuild (no registry needed):"
say "  ${host_note}./test.sh --no-build"
say "stop the hand-started daemon later with ./build-offline.sh --stop"
