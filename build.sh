#!/usr/bin/env bash
# Build the Grand-Challenge inference image (fmc) and the training image (fmc-train).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: ./build.sh [fmc|inference] [fmc-train|train] [--platform PLATFORM]

Builds both images, or only the ones named:
  fmc        Dockerfile        -> the inference container for grand-challenge.org
  fmc-train  Dockerfile.train  -> the training image (train.py prepare|fit|export|evaluate)

  --platform PLATFORM   target platform (default: linux/amd64, what the platform runs)
  -h, --help            this text

Environment:
  BASE_IMAGE         base image for both (default: the pinned pytorch/pytorch tag in
                     the Dockerfiles); passed as --build-arg BASE_IMAGE when set
  FMC_IMAGE          inference image tag (default: fmc)
  FMC_TRAIN_IMAGE    training image tag (default: fmc-train)
  DOCKER_BUILD_ARGS  extra `docker build` arguments, split on spaces
                     (e.g. "--network host" or "--no-cache --pull")
EOF
}

cd "$(dirname "${BASH_SOURCE[0]}")"

PLATFORM=linux/amd64
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    fmc | inference) targets+=(fmc) ;;
    fmc-train | train) targets+=(fmc-train) ;;
    --platform) PLATFORM=${2:?--platform needs a value}; shift ;;
    --platform=*) PLATFORM=${1#--platform=} ;;
    -h | --help) usage; exit 0 ;;
    *) echo "build.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
[ ${#targets[@]} -gt 0 ] || targets=(fmc fmc-train)

command -v docker >/dev/null || { echo "build.sh: docker is not installed" >&2; exit 1; }

common=(--platform "$PLATFORM")
if [ -n "${BASE_IMAGE:-}" ]; then
  common+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
fi
if [ -n "${DOCKER_BUILD_ARGS:-}" ]; then
  read -r -a extra <<<"$DOCKER_BUILD_ARGS"
  common+=("${extra[@]}")
fi

for target in "${targets[@]}"; do
  if [ "$target" = fmc ]; then
    tag=${FMC_IMAGE:-fmc}
    dockerfile=Dockerfile
  else
    tag=${FMC_TRAIN_IMAGE:-fmc-train}
    dockerfile=Dockerfile.train
  fi
  echo "=== building $tag from $dockerfile (platform $PLATFORM, base ${BASE_IMAGE:-Dockerfile default})"
  start=$SECONDS
  docker build "${common[@]}" --file "$dockerfile" --tag "$tag" .
  size=$(docker image inspect --format '{{.Size}}' "$tag")
  echo "=== built $tag in $((SECONDS - start)) s, $((size / 1000000)) MB"
done
