#!/usr/bin/env bash
# Pack the inference image and the model folder for upload to grand-challenge.org.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: ./export.sh [--image TAG] [--model DIR] [--out DIR] [--no-image] [--no-model]

Writes, into --out (default: the repository folder):
  <tag>.tar.gz   `docker save TAG | gzip`: the container image to upload as the algorithm
  model.tar.gz   the contents of model/ (e.g. nucleus/step1.safetensors + .json, ...):
                 the platform's separate model upload, extracted to /opt/ml/model
and prints both sizes. model/README.md is left out of the archive; with no
*.safetensors in model/ no model.tar.gz is written (the image then uses the weights
baked into it from resources/weights/).

  --image TAG   image to save (default: $FMC_IMAGE or fmc)
  --model DIR   model folder (default: model)
  --out DIR     where the archives go (default: .)
  --no-image    only model.tar.gz
  --no-model    only <tag>.tar.gz
  -h, --help    this text
EOF
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IMAGE=${FMC_IMAGE:-fmc}
MODEL=$ROOT/model
OUT=$ROOT
DO_IMAGE=1
DO_MODEL=1
while [ $# -gt 0 ]; do
  case "$1" in
    --image) IMAGE=${2:?--image needs a tag}; shift ;;
    --model) MODEL=${2:?--model needs a folder}; shift ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    --no-image) DO_IMAGE=0 ;;
    --no-model) DO_MODEL=0 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "export.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

mkdir -p "$OUT"
# gzip on all cores when pigz is there: the CUDA image is several GB.
if command -v pigz >/dev/null; then GZIP_CMD=(pigz -c); else GZIP_CMD=(gzip -c); fi
size_of() { du -h "$1" | cut -f1; }
written=()

partial=""
trap 'rm -f "$partial"' EXIT

if [ "$DO_IMAGE" = 1 ]; then
  docker image inspect "$IMAGE" >/dev/null 2>&1 || {
    echo "export.sh: image '$IMAGE' not found: run ./build.sh first" >&2
    exit 1
  }
  name=$(echo "${IMAGE%:latest}" | tr '/:' '__')
  target="$OUT/$name.tar.gz"
  partial="$target.partial"
  echo "=+= saving $IMAGE -> $target (${GZIP_CMD[0]})"
  docker save "$IMAGE" | "${GZIP_CMD[@]}" >"$partial"
  mv "$partial" "$target"
  written+=("$target")
fi

if [ "$DO_MODEL" = 1 ]; then
  if [ -d "$MODEL" ] && find "$MODEL" -name '*.safetensors' -print -quit | grep -q .; then
    target="$OUT/model.tar.gz"
    partial="$target.partial"
    echo "=+= packing $MODEL -> $target (extracted to /opt/ml/model on the platform)"
    # Paths relative to model/ (nucleus/step1.safetensors, ...), readable by the container's user.
    tar -C "$MODEL" --exclude=./README.md --exclude='*.partial' --owner=0 --group=0 --mode=a+rX \
      -cf - . | "${GZIP_CMD[@]}" >"$partial"
    mv "$partial" "$target"
    tar -tzf "$target" | grep -v '/$' | sed 's/^\.\//    /'
    written+=("$target")
  else
    echo "=+= $MODEL holds no *.safetensors: no model.tar.gz (the image uses its baked-in weights)"
  fi
fi

for file in "${written[@]}"; do
  echo "=+= $(size_of "$file")  $file"
done
