#!/usr/bin/env bash
# Run the inference image the way grand-challenge.org does, then check its outputs.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: ./test.sh [--input DIR] [--output DIR] [--model DIR] [--image TAG] [--no-build]
                 [-- INFERENCE_ARGS...]

Runs the inference image like the platform: a fresh output folder, --network none,
the input mounted read-only, /tmp on a Docker volume, model/ mounted read-only at
/opt/ml/model when it holds a model, the image's own non-root user, --gpus all when
Docker has the NVIDIA runtime. Then checks that every input has an output with the
same name and shape, dtype uint16 (BigTIFF), and prints a summary. Exits non-zero
when the run or any check fails.

  --input DIR    platform layout root (DIR/images/fluorescence-lightsheet-3D-microscopy/)
                 or a plain folder of .tif files (default: test/input). When it holds
                 no TIFF, the sample case is simulated into it (fmc.simulate, inside
                 the image, files owned by you).
  --output DIR   output root, emptied first; results land in
                 DIR/images/fused-fluorescence-lightsheet-3D-microscopy/ (default: test/output)
  --model DIR    model folder mounted at /opt/ml/model when it holds *.safetensors
                 (default: model)
  --image TAG    image to run (default: $FMC_IMAGE or fmc)
  --no-build     do not (re)build the image first with ./build.sh fmc
  -- ARGS        passed on to inference.py (e.g. -- --device cpu --log-level DEBUG)
  -h, --help     this text

Environment:
  GPUS       auto (default: on when `docker info` lists an nvidia runtime) | on | off
  SHM_SIZE   --shm-size (default: 2g)
  MEMORY     --memory limit (default: 16g, the platform's RAM; "none" for no limit)
  CPUS       --cpus limit (default: none; the platform has 4)
  PLATFORM   --platform (default: linux/amd64)
  BASE_IMAGE, DOCKER_BUILD_ARGS   passed to ./build.sh
EOF
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
INPUT_SLUG=images/fluorescence-lightsheet-3D-microscopy
OUTPUT_SLUG=images/fused-fluorescence-lightsheet-3D-microscopy

INPUT=$ROOT/test/input
OUTPUT=$ROOT/test/output
MODEL=$ROOT/model
IMAGE=${FMC_IMAGE:-fmc}
BUILD=1
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --input) INPUT=${2:?--input needs a folder}; shift ;;
    --output) OUTPUT=${2:?--output needs a folder}; shift ;;
    --model) MODEL=${2:?--model needs a folder}; shift ;;
    --image) IMAGE=${2:?--image needs a tag}; shift ;;
    --no-build) BUILD=0 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    *) echo "test.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

PLATFORM=${PLATFORM:-linux/amd64}
SHM_SIZE=${SHM_SIZE:-2g}
MEMORY=${MEMORY:-16g}
GPUS=${GPUS:-auto}
HOST_UID=$(id -u)
HOST_GID=$(id -g)

say() { echo "=+= $*"; }
die() { echo "test.sh: $*" >&2; exit 1; }
abspath() { mkdir -p "$1" && (cd "$1" && pwd -P); }

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "cannot reach the Docker daemon (is it running? are you in the docker group?)"

if [ "$BUILD" = 1 ]; then
  say "(re)building $IMAGE"
  FMC_IMAGE=$IMAGE "$ROOT/build.sh" fmc --platform "$PLATFORM"
fi
docker image inspect "$IMAGE" >/dev/null 2>&1 || die "image '$IMAGE' not found: run ./build.sh first"

# ---------------------------------------------------------------- input
INPUT=$(abspath "$INPUT")
if [ -d "$INPUT/$INPUT_SLUG" ] || [ -z "$(ls -A "$INPUT")" ]; then
  CASES=$INPUT/$INPUT_SLUG # platform layout: INPUT is /input
  INPUT_MOUNT=(--volume "$INPUT:/input:ro")
else
  CASES=$INPUT # a plain folder of TIFFs is the interface folder itself
  INPUT_MOUNT=(--volume "$INPUT:/input/$INPUT_SLUG:ro")
fi
mkdir -p "$CASES"
has_tiff() { find "$1" -maxdepth 1 -type f \( -iname '*.tif' -o -iname '*.tiff' \) -print -quit | grep -q .; }
if ! has_tiff "$CASES"; then
  say "no TIFF in $CASES: simulating the sample case (fmc.simulate.make_sample_case, inside $IMAGE)"
  # As the host user, so the files (and ground_truth/ beside the folder) are yours.
  docker run --rm --platform "$PLATFORM" --network none --user "$HOST_UID:$HOST_GID" \
    --volume "$(dirname "$CASES"):/data" --entrypoint python "$IMAGE" -c "
import sys
from pathlib import Path
from fmc.simulate import make_sample_case
for path in make_sample_case(Path('/data') / sys.argv[1], seed=0):
    print('    wrote', Path(sys.argv[2]) / path.relative_to('/data'))" "$(basename "$CASES")" "$(dirname "$CASES")"
fi
# The container's user must be able to read the cases and the model.
chmod -R -f o+rX "$CASES" 2>/dev/null || true
n_inputs=$(find "$CASES" -maxdepth 1 -type f \( -iname '*.tif' -o -iname '*.tiff' \) | wc -l)
say "input: $CASES ($n_inputs TIFF)"

# ---------------------------------------------------------------- output
OUTPUT=$(abspath "$OUTPUT")
case "$OUTPUT" in
  / | "$HOME" | "$ROOT") die "refusing to empty $OUTPUT: pick a dedicated --output folder" ;;
esac
case "$INPUT/" in "$OUTPUT"/*) die "--output $OUTPUT contains the input folder" ;; esac
if [ -n "$(ls -A "$OUTPUT")" ]; then
  say "emptying $OUTPUT"
  if ! find "$OUTPUT" -mindepth 1 -delete 2>/dev/null; then
    # Left by an interrupted run as the container's user: remove them as root in a container.
    docker run --rm --platform "$PLATFORM" --network none --user 0 --volume "$OUTPUT:/output" \
      --entrypoint find "$IMAGE" /output -mindepth 1 -delete
  fi
fi
OUTPUT_MODE=$(stat -c %a "$OUTPUT")
chmod 0777 "$OUTPUT" # the container's user creates images/... in it

# ---------------------------------------------------------------- options
RUN_OPTS=(--platform "$PLATFORM" --network none --shm-size "$SHM_SIZE")
[ "$MEMORY" != none ] && RUN_OPTS+=(--memory "$MEMORY" --memory-swap "$MEMORY")
[ -n "${CPUS:-}" ] && RUN_OPTS+=(--cpus "$CPUS")

runtimes=$(docker info --format '{{json .Runtimes}}' 2>/dev/null || echo '{}')
case "$GPUS" in
  auto)
    if grep -qi nvidia <<<"$runtimes"; then
      GPU_NOTE="on (nvidia runtime in docker info; GPUS=off to disable)"
      RUN_OPTS+=(--gpus all)
    else
      GPU_NOTE="off (no nvidia runtime in docker info; GPUS=on to force)"
    fi ;;
  on) GPU_NOTE="on (GPUS=on)"; RUN_OPTS+=(--gpus all) ;;
  off) GPU_NOTE="off (GPUS=off)" ;;
  *) die "GPUS must be auto, on or off (got '$GPUS')" ;;
esac
say "GPU: $GPU_NOTE"

MODEL_MOUNT=()
if [ -d "$MODEL" ] && find "$MODEL" -name '*.safetensors' -print -quit | grep -q .; then
  MODEL=$(abspath "$MODEL")
  chmod -R -f o+rX "$MODEL" 2>/dev/null || true
  MODEL_MOUNT=(--volume "$MODEL:/opt/ml/model:ro")
  say "model: $MODEL mounted read-only at /opt/ml/model"
else
  say "model: $MODEL holds no *.safetensors, using the weights baked into the image"
fi

TMP_VOLUME=fmc-test-tmp-$$
NAME=fmc-test-$$
cleanup() {
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  docker volume rm -f "$TMP_VOLUME" >/dev/null 2>&1 || true
  chmod "$OUTPUT_MODE" "$OUTPUT" 2>/dev/null || true
}
trap cleanup EXIT
docker volume create "$TMP_VOLUME" >/dev/null

# ---------------------------------------------------------------- run
say "running $IMAGE as its own user: docker run ${RUN_OPTS[*]} ... $IMAGE ${EXTRA[*]:-}"
start=$(date +%s.%N)
set +e
docker run --rm --name "$NAME" "${RUN_OPTS[@]}" \
  "${INPUT_MOUNT[@]}" \
  --volume "$OUTPUT:/output" \
  --volume "$TMP_VOLUME:/tmp" \
  "${MODEL_MOUNT[@]}" \
  "$IMAGE" "${EXTRA[@]}"
run_rc=$?
set -e
seconds=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
say "container exited with $run_rc after $seconds s"
if [ "$run_rc" = 137 ]; then
  say "exit 137: killed, most likely out of memory (MEMORY=$MEMORY; the platform has 16 GiB)"
fi
if awk -v s="$seconds" -v n="$n_inputs" 'BEGIN { exit !(s > 600 * (n > 0 ? n : 1)) }'; then
  say "WARNING: slower than the platform's budget of 10 minutes per case"
fi

# ---------------------------------------------------------------- check
# Inside the image (python + tifffile), as root: it first gives the outputs back
# to the host user, then compares every input with its output.
set +e
docker run --rm -i --platform "$PLATFORM" --network none --user 0 \
  "${INPUT_MOUNT[@]}" --volume "$OUTPUT:/output" --entrypoint python "$IMAGE" - \
  "$HOST_UID" "$HOST_GID" "$INPUT_SLUG" "$OUTPUT_SLUG" <<'PY'
import os
import sys
from pathlib import Path

import tifffile

uid, gid = int(sys.argv[1]), int(sys.argv[2])
inp, out = Path("/input") / sys.argv[3], Path("/output") / sys.argv[4]
for root, dirs, files in os.walk("/output"):
    for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
        os.lchown(name, uid, gid)


def describe(path):
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        return tuple(series.shape), str(series.dtype), tif.is_bigtiff


def tiffs(folder):
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".tif", ".tiff"))


inputs = tiffs(inp)
outputs = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
rows, failed = [], 0
for path in inputs:
    try:
        in_shape, in_dtype, _ = describe(path)
        source = f"{in_shape} {in_dtype}"
    except Exception as exc:  # a deliberately broken input: inference.py must report it
        in_shape, source = None, f"unreadable input ({type(exc).__name__})"
    target = out / path.name
    if not target.is_file():
        status = "no output" if in_shape is None else "FAIL: missing output"
        failed += in_shape is not None
        rows.append((path.name, source, "-", status))
        continue
    try:
        shape, dtype, bigtiff = describe(target)
    except Exception as exc:
        failed += 1
        rows.append((path.name, source, "?", f"FAIL: unreadable output: {exc}"))
        continue
    problems = []
    if in_shape is not None and shape != in_shape:
        problems.append(f"shape differs from the input {in_shape}")
    if dtype != "uint16":
        problems.append("dtype is not uint16")
    if not bigtiff:
        problems.append("not a BigTIFF")
    failed += bool(problems)
    rows.append((path.name, source, f"{shape} {dtype}", "FAIL: " + "; ".join(problems) if problems else "ok"))
for name in sorted(set(outputs) - {p.name for p in inputs}):
    failed += 1
    rows.append((name, "-", "-", "FAIL: output without an input (temporary or stray file)"))
if not inputs:
    failed += 1
    rows.append(("(none)", "-", "-", f"FAIL: no input TIFF in {inp}"))

width = max(len(r[0]) for r in rows)
n_ok = sum(r[3] == "ok" for r in rows)
print(f"=+= output check: {len(inputs)} input(s), {n_ok} ok, {failed} failed")
for name, source, result, status in rows:
    print(f"    {name:<{width}}  {source:<28} -> {result:<28} {status}")
sys.exit(1 if failed else 0)
PY
check_rc=$?
set -e

echo "=+= summary: inference exit $run_rc in $seconds s (GPU $GPU_NOTE), output check exit $check_rc"
echo "=+= outputs: $OUTPUT/$OUTPUT_SLUG"
if [ "$run_rc" != 0 ] || [ "$check_rc" != 0 ]; then
  echo "=+= FAILED" >&2
  exit 1
fi
echo "=+= PASSED"
