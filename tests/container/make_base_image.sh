#!/usr/bin/env bash
# Make (once) a local stand-in for the pytorch/pytorch base image, so the real
# Dockerfiles can be built where no image registry is reachable (CI, dev boxes).
#
# Debian bookworm (minbase, python 3.11 like the real base) + a venv at /opt/venv
# that is first on PATH (the image's `python` and `pip`) holding the CPU build of
# torch. The machine's CA bundle and package-index settings are copied in so that
# `docker build --network host` can pip-install requirements the way the host does.
# The tag is a hash of this script and the torch wheel: reruns reuse the image.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tests/container/make_base_image.sh [--tag-only] [--force]

Builds the stand-in base image fmc-standin-base:<hash> (debootstrap + docker import)
unless it already exists, and prints its tag as the last line of stdout.

  --tag-only   print the tag it would have and exit (nothing is built)
  --force      rebuild even when the tag exists
  -h, --help   this text

Needs root, debootstrap and a running Docker daemon. Environment:
  FMC_TORCH_WHEEL      CPU torch wheel for python 3.11
                       (default: /opt/wheels/torch-2.13.0+cpu-cp311-*.whl, else
                       `pip download torch==2.13.0` with the host's pip settings)
  FMC_CONTAINER_CACHE  work folder (default: ${XDG_CACHE_HOME:-~/.cache}/fmc/container)
  FMC_DEBIAN_MIRROR    Debian mirror (default: the host's apt source, else deb.debian.org)
  PYTHON               host python whose pip downloads the wheels (default: python3)
EOF
}

TAG_ONLY=0
FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tag-only) TAG_ONLY=1 ;;
    --force) FORCE=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

log() { echo "[make_base_image] $*" >&2; }

SUITE=bookworm
PY_TAG=cp311
TORCH_VERSION=2.13.0
PYTHON=${PYTHON:-python3}
CACHE=${FMC_CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fmc/container}
VENV_PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOST_CA=/etc/ssl/certs/ca-certificates.crt

find_wheel() {
  if [ -n "${FMC_TORCH_WHEEL:-}" ]; then
    echo "$FMC_TORCH_WHEEL"
    return
  fi
  local w
  for w in /opt/wheels/torch-"${TORCH_VERSION}"+cpu-"${PY_TAG}"-*.whl; do
    [ -f "$w" ] && { echo "$w"; return; }
  done
  echo ""
}

WHEEL=$(find_wheel)
# The tag changes when this recipe or the torch wheel changes.
TAG="fmc-standin-base:$(
  { cat "${BASH_SOURCE[0]}"; echo "${WHEEL##*/}"; } | sha256sum | cut -c1-12
)"

if [ "$TAG_ONLY" = 1 ]; then
  echo "$TAG"
  exit 0
fi

if [ "$FORCE" = 0 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  log "cached: $TAG"
  echo "$TAG"
  exit 0
fi

[ "$(id -u)" = 0 ] || { log "debootstrap needs root"; exit 1; }
command -v debootstrap >/dev/null || { log "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
[ -f "$HOST_CA" ] || { log "no CA bundle at $HOST_CA"; exit 1; }

mirror=${FMC_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(sed -n 's/^URIs:[[:space:]]*\(http[^[:space:]]*\/debian\)[[:space:]]*$/\1/p' \
    /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1 || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

mkdir -p "$CACHE"
rootfs=$(mktemp -d "$CACHE/standin-rootfs.XXXXXX")
chmod 0755 "$rootfs" # it becomes the image's / (vfs keeps mktemp's 0700: only root could run)
cleanup() { rm -rf "$rootfs"; }
trap cleanup EXIT

start=$SECONDS
log "debootstrap $SUITE from $mirror into $rootfs"
debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
  "$SUITE" "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 || {
  tail -n 30 "$CACHE/debootstrap.log" >&2
  exit 1
}
log "debootstrap done in $((SECONDS - start)) s"

# The machine's CA bundle (it may hold a proxy's CA) where Debian keeps it.
cp "$HOST_CA" "$rootfs/etc/ssl/certs/ca-certificates.crt"

# torch + its dependencies, fetched with the host's pip settings, installed offline.
wheels="$rootfs/tmp/wheels"
mkdir -p "$wheels"
if [ -n "$WHEEL" ]; then
  log "torch wheel: $WHEEL"
  cp "$WHEEL" "$wheels/"
  spec="$wheels/${WHEEL##*/}"
else
  log "no local torch wheel: downloading torch==$TORCH_VERSION with the host's pip"
  spec="torch==$TORCH_VERSION"
fi
"$PYTHON" -m pip download --quiet --dest "$wheels" --only-binary=:all: \
  --python-version 3.11 --implementation cp --abi "$PY_TAG" --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform linux_x86_64 --platform any \
  "$spec"
torch_file=$(cd "$wheels" && ls torch-*.whl)
chroot "$rootfs" /usr/bin/env -i PATH="$VENV_PATH" HOME=/root LANG=C.UTF-8 /bin/sh -ec "
  python3 -m venv /opt/venv
  /opt/venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check \
    --no-index --find-links /tmp/wheels /tmp/wheels/$torch_file
  /opt/venv/bin/python -c 'import torch; print(\"torch\", torch.__version__)'
  rm -rf /tmp/wheels /var/cache/apt/archives/*.deb /var/lib/apt/lists/*
" >&2

# Package-index settings the host's pip uses over the network (file:// indexes
# and find-links on the host's disk cannot be reached from a container).
changes=(
  --change "ENV PATH=$VENV_PATH"
  --change "ENV LANG=C.UTF-8"
  --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt"
  --change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
  --change "ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt"
  --change "LABEL org.fmc.standin=true"
  --change 'CMD ["python"]'
)
http_only() { tr ' ' '\n' | grep -E '^https?://' | paste -sd ' ' - || true; }
index_url=${PIP_INDEX_URL:-$("$PYTHON" -m pip config get global.index-url 2>/dev/null || true)}
extra_url=${PIP_EXTRA_INDEX_URL:-$("$PYTHON" -m pip config get global.extra-index-url 2>/dev/null || true)}
trusted=${PIP_TRUSTED_HOST:-$("$PYTHON" -m pip config get global.trusted-host 2>/dev/null || true)}
index_url=$(echo "$index_url" | http_only)
extra_url=$(echo "$extra_url" | tr '\n' ' ' | http_only)
[ -n "$index_url" ] && changes+=(--change "ENV PIP_INDEX_URL=$index_url")
[ -n "$extra_url" ] && changes+=(--change "ENV PIP_EXTRA_INDEX_URL=$extra_url")
[ -n "$trusted" ] && changes+=(--change "ENV PIP_TRUSTED_HOST=$(echo "$trusted" | tr '\n' ' ')")
for var in PIP_DEFAULT_TIMEOUT HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
  if [ -n "${!var:-}" ]; then
    changes+=(--change "ENV $var=${!var}")
  fi
done
log "pip settings baked in: $(printf '%s ' "${changes[@]}" | grep -o 'ENV [A-Za-z_]*=' | tr '\n' ' ')"

log "docker import -> $TAG"
tar -C "$rootfs" --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -c . |
  docker import "${changes[@]}" - "$TAG" >/dev/null
log "done in $((SECONDS - start)) s: $(docker image inspect --format '{{.Size}}' "$TAG" | numfmt --to=iec)"
echo "$TAG"
