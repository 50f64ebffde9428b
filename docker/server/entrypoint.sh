#!/usr/bin/env bash
# Entry point of the pimoe-export images (docker/server, docker/jetson). Rung 7 of the verification ladder:
# real TensorRT 11 build + run + Polygraphy TrtRunner, on a GPU, inside the image. Not run by CI (no Docker engine).
#
#   pipeline [ARGS...]   pimoe-export pipeline --preset $PIMOE_PRESET -o $PIMOE_ENGINES_DIR/$PIMOE_PRESET
#                        (flavour auto picks full TensorRT here: engines land in trt-fp32/ and trt-int8/)
#   gpu-tests [ARGS...]  python -m pytest -m gpu (plugin kernels through the harness, vs PyTorch)
#   check [UNIT_DIR]     pimoe-export check MODEL_DIR --unit UNIT_DIR: Polygraphy TrtRunner parity of a TensorRT
#                        unit vs the PyTorch reference (default unit: $PIMOE_ENGINES_DIR/$PIMOE_PRESET/trt-fp32,
#                        model: the pipeline's model/ next to it; run `pipeline` first)
#   triton [UNIT_DIR]    pimoe-export triton UNIT_DIR -o $PIMOE_ENGINES_DIR/triton (a Triton model repository)
#   help                 this text
#   anything else        executed as a command (e.g. `bash`, `pimoe-export inspect ...`)
#
# Environment: PIMOE_APP_DIR (default: the folder above docker/), PIMOE_ENGINES_DIR (default /workspace/engines:
# mount a volume there to keep the results), PIMOE_PRESET (default seed-512).
set -euo pipefail
app=${PIMOE_APP_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}
engines=${PIMOE_ENGINES_DIR:-/workspace/engines}
preset=${PIMOE_PRESET:-seed-512}
python="$app/.venv/bin/python"
cli="$app/.venv/bin/pimoe-export"

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
need_venv() {
  [ -x "$cli" ] || { echo "entrypoint.sh: $cli is missing: the image was not built with docker/build_in_image.sh" >&2; exit 2; }
}

command=${1:-help}
[ $# -gt 0 ] && shift
case $command in
  pipeline)
    need_venv
    mkdir -p "$engines"
    exec "$cli" pipeline --preset "$preset" -o "$engines/$preset" "$@"
    ;;
  gpu-tests)
    need_venv
    cd "$app"
    exec "$python" -m pytest -m gpu -q "$@"
    ;;
  check)
    need_venv
    unit=${1:-$engines/$preset/trt-fp32}
    [ $# -gt 0 ] && shift
    model=$(dirname "$unit")/model
    if [ ! -f "$unit/manifest.json" ] || [ ! -d "$model" ]; then
      echo "entrypoint.sh check: no TensorRT unit at $unit (or no model/ checkpoint next to it); run the pipeline first:" >&2
      echo "  docker run --gpus all -v \$PWD/engines:$engines IMAGE pipeline" >&2
      exit 2
    fi
    exec "$cli" check "$model" --unit "$unit" "$@"
    ;;
  triton)
    need_venv
    unit=${1:-$engines/$preset/trt-fp32}
    [ $# -gt 0 ] && shift
    exec "$cli" triton "$unit" -o "$engines/triton" "$@"
    ;;
  help|-h|--help)
    usage
    ;;
  *)
    exec "$command" "$@"
    ;;
esac
