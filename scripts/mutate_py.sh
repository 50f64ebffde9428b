#!/usr/bin/env bash
# Mutation testing of the Python package (docs/mutation.md): mutmut 3 mutates the modules below one at a time and
# runs the fast tests that exercise them; a mutant no test fails "survived".
#
#   scripts/mutate_py.sh            # run (incremental: unchanged mutants keep their result), then list the results
#   scripts/mutate_py.sh --fresh    # forget earlier results first
#
# It works in a scratch copy, build/mutmut-py/ (mutmut writes its mutated tree to mutants/ under the directory it
# runs in), so the checkout is never modified. Needs the `mutation` extra: .venv/bin/pip install -e '.[mutation]'.
# Summary counts: build/mutmut-py/mutants/mutmut-cicd-stats.json; one mutant's diff:
#   (cd build/mutmut-py && ../../.venv/bin/mutmut show NAME)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
WORK=$ROOT/build/mutmut-py

# the modules mutated, and the tests run against each mutant (fast: numpy/onnx only, no model training)
MODULES=(
  pimoe_export/validate/metrics.py
  pimoe_export/validate/compare.py
  pimoe_export/quantize/calibrate.py
  pimoe_export/cli/_common.py
)
TESTS=(
  tests/validate/test_metrics.py
  tests/quantize/test_calibrate.py
  tests/cli/test_cli_arguments.py
  tests/test_interface.py
  tests/quantize/test_quantize.py::test_weight_quantisation_is_symmetric_per_channel
  tests/quantize/test_quantize.py::test_thresholds_on_known_distributions
  tests/quantize/test_quantize.py::test_calibration_data_formats_and_errors
  tests/quantize/test_quantize.py::test_calibration_sees_every_expert_layer_input
  tests/validate/test_embedding_metric.py
)
# a listed file that this checkout lacks is left out (mutmut would stop on it)
present=()
for t in "${TESTS[@]}"; do [[ -f "${t%%::*}" ]] && present+=("$t"); done
TESTS=("${present[@]}")

"$PY" -c "import mutmut" 2>/dev/null || { echo "mutmut is not installed: .venv/bin/pip install -e '.[mutation]'" >&2; exit 3; }
[[ "${1:-}" == "--fresh" ]] && rm -rf "$WORK"
mkdir -p "$WORK"
# the package and the tests, mirrored (deletions too) so the copy is exactly the checkout's
for d in pimoe_export tests; do
  rm -rf "$WORK/$d.new" && cp -r "$ROOT/$d" "$WORK/$d.new" && rm -rf "$WORK/$d" && mv "$WORK/$d.new" "$WORK/$d"
done
find "$WORK" -name __pycache__ -prune -exec rm -rf {} +
"$PY" - "$WORK" "${MODULES[@]}" -- "${TESTS[@]}" <<'PYEOF'
import json, sys, tomllib
from pathlib import Path
work, rest = Path(sys.argv[1]), sys.argv[2:]
modules, tests = rest[:rest.index("--")], rest[rest.index("--") + 1:]
pytest_cfg = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
q = json.dumps
lines = ["[tool.mutmut]", 'source_paths = ["pimoe_export"]', f"only_mutate = {q(modules)}",
         f"pytest_add_cli_args_test_selection = {q(tests)}",
         'pytest_add_cli_args = ["-p", "no:logging", "-p", "no:cacheprovider", "-x", "-q"]',
         # torch is not fork-safe: fork each mutant's worker from a clean server process
         'process_isolation = "forkserver"', "",
         "[tool.pytest.ini_options]", f"markers = {q(pytest_cfg['markers'])}", ""]
(work / "pyproject.toml").write_text("\n".join(lines))
PYEOF
cd "$WORK"
# the copy has no build tree: the tests that need the ONNX Runtime op library use the checkout's
export PIMOE_ORT_LIBRARY=${PIMOE_ORT_LIBRARY:-$ROOT/build/plugins/libpimoe_ort.so}
"$PY" -m mutmut run --max-children "${MUTMUT_JOBS:-2}" || true
"$PY" -m mutmut export-cicd-stats >/dev/null 2>&1 || true
"$PY" -m mutmut results --all true 2>/dev/null | grep -v ": killed$" || true
cat mutants/mutmut-cicd-stats.json 2>/dev/null || true
