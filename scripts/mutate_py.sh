#!/usr/bin/env bash
# Mutation testing of the whole Python package (docs/mutation.md): every subpackage of pimoe_export is one group
# with the tests that exercise it (fast ones; slow, emulated-GPU and server tests left out), run in its own scratch
# copy. mutmut 3 makes every mutant of the group; a seeded random sample of them is run, each against the selected
# tests that reach the mutated function (fastest file first, -x); a mutant no test fails "survived".
#
#   scripts/mutate_py.sh                       # every group: sample, run (incremental), then the scores
#   scripts/mutate_py.sh --fresh               # forget earlier results and samples first
#   scripts/mutate_py.sh --groups ops,serve    # only these groups
#   scripts/mutate_py.sh --report              # only print the scores of the last run
#   SAMPLE=60 SEED=29 MUTMUT_JOBS=2 scripts/mutate_py.sh
#
# It works in build/mutmut-py/<group>/ (mutmut writes its mutated tree to mutants/ there), so the checkout is never
# modified. Needs the `mutation` extra: .venv/bin/pip install -e '.[mutation]'. Per group: sample.json (the seed,
# the chosen mutants and the unreached ones met before them) and result.json; all groups: build/mutmut-py/scores.json.
# One mutant's diff: (cd build/mutmut-py/GROUP && ../../../.venv/bin/mutmut show NAME).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=$ROOT/build/mutmut-py
SAMPLE=${SAMPLE:-40}   # scored mutants per group (mutants no selected test reaches are reported, not counted)
SEED=${SEED:-29}
JOBS=${MUTMUT_JOBS:-2}

# group | the modules mutated (globs) | the tests run against them (files or folders; -m "not slow" is added)
GROUPS_TABLE=(
  "foundation|pimoe_export/__init__.py pimoe_export/errors.py pimoe_export/interface.py pimoe_export/_files.py|tests/test_interface.py tests/test_interface_contract.py tests/test_foundation.py tests/cli/test_cli_arguments.py tests/cli/test_cli_errors.py tests/cli/test_exit_codes.py tests/artifacts tests/runtime/test_units_runtime.py"
  "model|pimoe_export/model/*|tests/model"
  "ops|pimoe_export/ops/*|tests/ops/test_validation.py tests/ops/test_op_boundaries.py tests/ops/test_onnx_schema_build.py tests/ops/test_onnx_translation.py tests/ops/test_onnx_schema.py tests/ops/test_ort_op_bad_inputs.py tests/ops/test_contract_agreement.py tests/export/test_export_ort.py tests/test_repo_hygiene.py::test_generated_files_match_their_sources tests/native/test_trt_lean.py::test_plugin_configs_read_back_as_the_contract"
  "native|pimoe_export/native/*|tests/native tests/ops/test_ort_op_bad_inputs.py tests/runtime/test_ort_cuda.py tests/artifacts tests/build/test_trt_rtx.py"
  "hf|pimoe_export/hf/*|tests/hf"
  "export|pimoe_export/export/*|tests/export tests/integration/test_whole_model.py"
  "quantize|pimoe_export/quantize/*|tests/quantize tests/integration/test_whole_model.py"
  "artifacts|pimoe_export/artifacts/*|tests/artifacts tests/runtime/test_units_runtime.py tests/serve/test_triton.py tests/serve/test_triton_repository.py"
  "build|pimoe_export/build/*|tests/build tests/artifacts tests/runtime/test_units_runtime.py tests/integration/test_whole_model.py"
  "runtime|pimoe_export/runtime/*|tests/runtime tests/artifacts"
  "serve|pimoe_export/serve/*|tests/serve/test_triton.py tests/serve/test_triton_repository.py tests/serve/test_serve_options.py"
  "testing|pimoe_export/testing/*|tests/emu/test_trt_harness_prepare.py tests/emu/test_emu.py tests/ops/test_contract_agreement.py tests/testing"
  "validate|pimoe_export/validate/*|tests/validate tests/export/test_export_ort.py tests/integration/test_whole_model.py"
  "bench|pimoe_export/bench/*|tests/bench tests/validate/test_check_report.py"
  "pipeline|pimoe_export/pipeline.py|tests/pipeline tests/integration/test_one_path.py tests/export/test_export_options.py"
  "cli|pimoe_export/cli/*|tests/cli tests/runtime/test_units_runtime.py tests/serve/test_serve_options.py tests/hf/test_hf_io.py"
)

only="" fresh=0 report_only=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --fresh) fresh=1 ;;
    --groups) only=",$2,"; shift ;;
    --report) report_only=1 ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done

"$PY" -c "import mutmut" 2>/dev/null || { echo "mutmut is not installed: .venv/bin/pip install -e '.[mutation]'" >&2; exit 3; }
if [[ $report_only == 0 ]]; then
  [[ $fresh == 1 ]] && rm -rf "$OUT"
  # the copies have no build tree: the tests that need the compiled libraries use the checkout's (those built)
  for pair in PIMOE_ORT_LIBRARY=libpimoe_ort.so PIMOE_ORT_CUDA_LIBRARY=libpimoe_ort_cuda.so \
              PIMOE_ORT_CUDA_EMU_LIBRARY=emu/libpimoe_ort_cuda_emu.so PIMOE_TRT_PLUGINS=trt/libpimoe_trt_plugins.so \
              PIMOE_TRT_HARNESS=harness/libpimoe_trt_harness.so PIMOE_TRT_HARNESS_EMU=emu/libpimoe_trt_harness_emu.so; do
    var=${pair%%=*} lib=$ROOT/build/plugins/${pair#*=}
    if [[ -z ${!var:-} && -f $lib ]]; then export "$var=$lib"; fi
  done
  # one thread per test process: JOBS mutants run side by side, and mutmut's timeout counts CPU seconds
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  for row in "${GROUPS_TABLE[@]}"; do
    IFS='|' read -r group modules tests <<< "$row"
    [[ -n $only && $only != *",$group,"* ]] && continue
    start=$(date +%s)
    set -f  # the module globs go to mutmut as they are
    # shellcheck disable=SC2086  # the module globs and test paths are word lists
    "$PY" scripts/mutate_py.py prepare "$OUT/$group" --group "$group" --modules $modules --tests $tests || { set +f; continue; }
    set +f
    "$PY" scripts/mutate_py.py sample "$OUT/$group" --group "$group" --seed "$SEED" --size "$SAMPLE" \
      > "$OUT/$group/sample.log" 2>&1 || { tail -5 "$OUT/$group/sample.log"; continue; }
    tail -1 "$OUT/$group/sample.log"
    "$PY" scripts/mutate_py.py run "$OUT/$group" --jobs "$JOBS" > "$OUT/$group/run.log" 2>&1 || true
    echo "$group: $(( $(date +%s) - start )) s"
  done
fi
"$PY" scripts/mutate_py.py report "$OUT" --json "$OUT/scores.json"
