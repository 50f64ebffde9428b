"""The package's seams: imports flow one way down the pipeline, each fact lives in one place, functions stay small.

These read the source (ast and text), so they hold for code paths no other test executes (lazy imports inside
functions included). Each test names the offending file and line when it fails.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pimoe_export"

#: the pipeline, in order: a subpackage may import only those before it (and the foundation)
ORDER = ("model", "ops", "native", "hf", "export", "quantize", "artifacts", "build", "runtime", "serve", "testing",
         "validate", "bench", "pipeline", "cli")
#: imported by everything, importing nothing of the pipeline
FOUNDATION = ("errors", "interface", "_files")
MAX_FUNCTION_LINES = 80


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z", *patterns], cwd=ROOT, capture_output=True, check=True)
    return [ROOT / p for p in out.stdout.decode().split("\0") if p and (ROOT / p).is_file()]


def _unit_of(path: Path) -> str:
    """pimoe_export/ops/schema.py -> "ops"; pimoe_export/pipeline.py -> "pipeline"."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_units(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """(subpackage, line) for every pimoe_export import in the file, absolute or relative, at any depth."""
    found = []
    package = list(path.relative_to(root).parent.parts)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names = [f"{module}.{a.name}" for a in node.names] if module == "pimoe_export" else [module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "pimoe_export" and len(parts) > 1:
                found.append((parts[1], node.lineno))
    return found


def test_the_order_names_every_subpackage() -> None:
    units = {_unit_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert units == set(ORDER) | set(FOUNDATION), units ^ (set(ORDER) | set(FOUNDATION))
    for directory in (p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"):
        assert (directory / "__init__.py").is_file(), f"{directory} is not a package (setuptools would drop it)"


def test_imports_flow_one_way_down_the_pipeline() -> None:
    rank = {name: i for i, name in enumerate(ORDER)}
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _unit_of(path)
        for target, line in _imported_units(path):
            if target == me or target == "__version__":
                continue
            if me in FOUNDATION:  # the foundation imports only the foundation before it
                ok = target in FOUNDATION and FOUNDATION.index(target) < FOUNDATION.index(me)
            elif me == "__init__" or target in FOUNDATION:  # the root's lazy table may name any model class
                ok = True
            else:
                ok = rank[target] < rank[me]
            if not ok:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {me} imports {target}")
    assert not wrong, "imports against the pipeline order " + " -> ".join(ORDER) + ":\n" + "\n".join(wrong)


def test_the_direction_check_sees_lazy_and_relative_imports(tmp_path) -> None:
    """The checker itself: an import inside a function and a relative one are both found."""
    probe = tmp_path / "pimoe_export" / "ops" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from pimoe_export.validate import check\n\nfrom ..runtime import engine\n")
    assert sorted(_imported_units(probe, root=tmp_path)) == [("runtime", 4), ("validate", 2)]


def test_no_function_in_the_package_is_over_80_lines() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, long


# ------------------------------------------------------------------------------------------ facts defined once
def _python_sources() -> list[Path]:
    return [p for p in _tracked("pimoe_export", "scripts") if p.suffix == ".py"]


def _stray(pattern: str, files: list[Path], allowed: set[str]) -> list[str]:
    regex = re.compile(pattern)
    hits = []
    for path in files:
        rel = str(path.relative_to(ROOT))
        if rel in allowed:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            code = line.split("#", 1)[0] if path.suffix in (".py", ".sh", ".txt") else line.split("//", 1)[0]
            if regex.search(code):
                hits.append(f"{rel}:{number}: {line.strip()}")
    return hits


INTERFACE = {"pimoe_export/interface.py"}

FACTS = {
    # fact: (regex of a stray copy, files searched, files allowed to hold it)
    "graph I/O names": (r"""["'](hidden_states|expert_weights)["']""", _python_sources, INTERFACE),
    "ONNX metadata keys": (r"""["']pimoe\.(config|contract_version|graph|precision|exporter|weights_sha256|"""
                           r"""quantization)["']""", _python_sources, INTERFACE),
    "contract limits": (r"^\s*(MAX_EXPERTS|MAX_TOP_K|MAX_LAYERS|INT32_LIMIT)\s*[:=]", _python_sources, INTERFACE),
    "default profiles": (r"^\s*\w*PROFILE\w*\s*(: [^=]+)?=\s*Profile\(", _python_sources, INTERFACE),
    "tolerances": (r"\bTolerances\(", _python_sources, INTERFACE),
    "model input names": (r"""["'](attention_mask|input_ids)["']""", _python_sources, INTERFACE),
    "decoder I/O names": (r"""["']position_ids["']|["'](past_key_values|present)\.""", _python_sources,
                          INTERFACE),
    "the unit manifest's file name": (r"""["']manifest\.json["']""", _python_sources,
                                      {"pimoe_export/artifacts/manifest.py"}),
    "the checkpoint weights' file name": (r"""["']model\.safetensors["']""", _python_sources,
                                          {"pimoe_export/model/io.py"}),
    "op names": (r"""["']PiMoE(Route|Dispatch|ExpertMLP|Combine)["']""", _python_sources,
                 {"pimoe_export/ops/schema.py"}),
    "ONNX opset": (r"opset_version\s*=\s*\d", _python_sources, INTERFACE),
    "CUDA architecture list": (r"""80.{1,4}86""",
                               lambda: [p for p in _tracked("pimoe_export", "scripts", "plugins", "docker",
                                                            "pyproject.toml", ".ci")
                                        if p.suffix in (".py", ".sh", ".txt", ".cmake", ".toml", "")
                                        and "emu" not in p.parts],
                               {*INTERFACE, "plugins/cmake/cuda_architectures.txt",  # generated from interface.py
                                "docker/server/Dockerfile", "docker/jetson/Dockerfile"}),  # tested equal below
    "contract limits in the C++/CUDA": (r"(?<![<>])([<>]=?|==)\s*(1024|16)\b|\[\s*1024\s*\]",
                                        lambda: [p for p in _tracked("plugins") if p.suffix in (".cu", ".cuh", ".h",
                                                                                                ".cpp")
                                                 and "emu" not in p.parts],
                                        {"plugins/common/pimoe_contract.h"}),
}


@pytest.mark.parametrize("fact", list(FACTS))
def test_each_fact_is_defined_once(fact: str) -> None:
    pattern, files, allowed = FACTS[fact]
    hits = _stray(pattern, files(), allowed)
    assert not hits, f"{fact}: copies outside {sorted(allowed)}:\n" + "\n".join(hits)


def test_the_stray_copy_search_finds_a_planted_copy(tmp_path) -> None:
    """The greps can fail: each pattern matches a line that restates its fact."""
    planted = {
        "graph I/O names": 'feeds = {"hidden_states": x}',
        "ONNX metadata keys": 'props["pimoe.precision"]',
        "contract limits": "MAX_TOP_K = 16",
        "default profiles": "MY_PROFILE = Profile((1, 1), (1, 8), (4, 64))",
        "tolerances": "Tolerances(1e-5, 1e-5)",
        "model input names": 'mask = feed["attention_mask"]',
        "decoder I/O names": 'names = [f"past_key_values.{i}.key" for i in range(layers)]',
        "the unit manifest's file name": 'path = unit / "manifest.json"',
        "the checkpoint weights' file name": 'save_file(state, directory / "model.safetensors")',
        "op names": 'routes = [n for n in graph.node if n.op_type == "PiMoERoute"]',
        "ONNX opset": "torch.onnx.export(m, x, f, opset_version=18)",
        "CUDA architecture list": 'set(archs "80;86;89")',
        "contract limits in the C++/CUDA": "if (k > 16) return cudaErrorInvalidValue;",
    }
    assert set(planted) == set(FACTS)
    for fact, line in planted.items():
        suffix = ".cu" if "C++" in fact else ".py"
        probe = tmp_path / f"probe{suffix}"
        probe.write_text(line + "\n")
        assert re.search(FACTS[fact][0], line), fact


def _british_spelt_identifiers(files: list[Path]) -> list[str]:
    import io
    import tokenize

    hits = []
    for path in files:
        for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if token.type == tokenize.NAME and "artefact" in token.string.lower():
                hits.append(f"{path.name}:{token.start[0]}: {token.string}")
    return hits


def test_identifiers_spell_artifact_one_way(tmp_path) -> None:
    """Names in code say "artifact" (ArtifactError, the artifacts package, the manifest's artifacts); prose may
    say artefact."""
    assert not _british_spelt_identifiers(_tracked("*.py")), _british_spelt_identifiers(_tracked("*.py"))
    probe = tmp_path / "probe.py"
    probe.write_text('"""an artefact in prose"""\ndef check_artefacts():  # and in a comment: artefact\n    pass\n')
    assert _british_spelt_identifiers([probe]) == ["probe.py:2: check_artefacts"]


def test_docker_images_default_to_the_interface_targets() -> None:
    from pimoe_export.interface import CUDA_ARCHITECTURES, IMAGE_CUDA_ARCHITECTURES

    for image, targets in IMAGE_CUDA_ARCHITECTURES.items():
        text = (ROOT / "docker" / image / "Dockerfile").read_text()
        match = re.search(r'^ARG PIMOE_CUDA_ARCHITECTURES="([^"]*)"', text, re.MULTILINE)
        assert match, f"docker/{image}/Dockerfile has no PIMOE_CUDA_ARCHITECTURES default"
        assert match.group(1) == ";".join(targets), (image, match.group(1))
    assert set(IMAGE_CUDA_ARCHITECTURES["server"]) <= set(CUDA_ARCHITECTURES)  # CI compiles every server target


# ------------------------------------------------------------------------------------------ edges
def test_nothing_refers_to_files_outside_the_repository() -> None:
    files = [p for p in _tracked() if p.suffix in (".py", ".md", ".sh", ".txt", ".cmake", ".cpp", ".h", ".cu",
                                                   ".cuh", ".toml", "")]
    hits = _stray(r"ARCHITECTURE\.md|SEED_NOTES|STYLE\.md|ENVIRONMENT\.md|\.\./shared|/work/", files,
                  {"tests/test_seams.py"})
    assert not hits, hits


def test_scripts_do_not_import_tests() -> None:
    hits = _stray(r"^\s*(from|import)\s+tests\b|sys\.path.*tests", [p for p in _tracked("scripts")
                                                                       if p.suffix == ".py"], set())
    assert not hits, hits


#: repository paths docs name: a file or a folder under one of the tracked top-level folders (engines/ holds outputs)
DOC_PATH = re.compile(r"(?<![\w/.-])((?:pimoe_export|scripts|tests|plugins|docs|docker)/[\w/.*-]*)")
#: dotted module names docs name: pimoe_export.<package>[.<module>][.<attribute>]
DOC_MODULE = re.compile(r"(?<![\w/.])(pimoe_export(?:\.\w+)+)")


def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _stale_doc_references(root: Path, docs: list[Path]) -> list[str]:
    """Every path, folder or dotted module name the docs give that does not exist under ``root`` (a path: from the
    root or from the doc's folder, globs matching something; a dotted name: the longest prefix that is a module, and
    the first attribute after it, which the module must define)."""
    stale = []
    for doc in docs:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            where = f"{doc.relative_to(root)}:{number}"
            for path in DOC_PATH.findall(line):  # from the repository root, or from the doc's folder (a glob too)
                path = path.rstrip(".")
                if not any(next(base.glob(path), None) for base in (root, doc.parent)):
                    stale.append(f"{where}: {path}")
            for dotted in DOC_MODULE.findall(line):
                parts = dotted.split(".")
                for end in range(len(parts), 0, -1):
                    base = root.joinpath(*parts[:end])
                    module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
                    if module.is_file():
                        rest = parts[end:]
                        if rest and rest[0] not in _top_level_names(module) and not (base / f"{rest[0]}.py").exists():
                            stale.append(f"{where}: {dotted} ({rest[0]} is not in {module.relative_to(root)})")
                        break
                else:
                    stale.append(f"{where}: {dotted}")
    return stale


def test_every_module_folder_and_path_the_docs_name_exists() -> None:
    """Docs drift when code moves: every repository path and folder (pimoe_export/..., scripts/..., tests/...,
    plugins/..., docs/..., docker/...) and every dotted module name (pimoe_export.a.b[.name]) that a
    Markdown file gives exists."""
    stale = _stale_doc_references(ROOT, _tracked("*.md"))
    assert not stale, stale


def test_every_module_and_path_the_shell_scripts_and_dockerfiles_name_exists() -> None:
    """The same for shell scripts and Dockerfiles (they name test files, modules in inline Python, folders)."""
    scripts = [p for p in _tracked("*.sh", "docker", ".ci") if p.suffix == ".sh" or p.name in ("Dockerfile", "run")]
    stale = _stale_doc_references(ROOT, scripts)
    assert not stale, stale


def test_the_docs_check_finds_planted_stale_names(tmp_path) -> None:
    """The checker can fail: a moved module, a vanished folder, a renamed file and a missing attribute are found."""
    (tmp_path / "pimoe_export" / "runtime").mkdir(parents=True)
    (tmp_path / "pimoe_export" / "__init__.py").write_text("")
    (tmp_path / "pimoe_export" / "runtime" / "__init__.py").write_text("")
    (tmp_path / "pimoe_export" / "runtime" / "engine.py").write_text("class Engine:\n    pass\n")
    doc = tmp_path / "README.md"
    doc.write_text("`pimoe_export.runtime.engine.Engine` and `pimoe_export/runtime/` exist;\n"
                   "`pimoe_export.runtime.harness`, `pimoe_export.build.tensorrt`, `pimoe_export/deploy/`,\n"
                   "`tests/test_gone.py` and `pimoe_export.runtime.engine.RunError` do not.\n")
    stale = _stale_doc_references(tmp_path, [doc])
    assert sorted(s.split(": ", 1)[1].split(" ")[0] for s in stale) == [
        "pimoe_export.build.tensorrt", "pimoe_export.runtime.engine.RunError", "pimoe_export.runtime.harness",
        "pimoe_export/deploy/", "tests/test_gone.py"], stale


def _imported_modules(path: Path) -> list[tuple[str, int]]:
    """(top-level module, line) of every import in the file, at any depth (relative imports: the package's)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".")[0], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.append((node.module.split(".")[0], node.lineno))
    return found


def _transformers_outside_hf(package: Path) -> list[str]:
    return [f"{path.relative_to(package.parent)}:{line}" for path in sorted(package.rglob("*.py"))
            for module, line in _imported_modules(path)
            if module == "transformers" and path.relative_to(package).parts[0] != "hf"]


def test_transformers_is_imported_only_in_the_hugging_face_package() -> None:
    offenders = _transformers_outside_hf(PACKAGE)
    assert not offenders, f"transformers imported outside pimoe_export/hf: {offenders}"


def test_the_transformers_check_finds_a_planted_import(tmp_path) -> None:
    for folder, text in (("hf", "import transformers\n"), ("export", "def f():\n    from transformers import x\n")):
        (tmp_path / "pimoe_export" / folder).mkdir(parents=True)
        (tmp_path / "pimoe_export" / folder / "probe.py").write_text(text)
    assert _transformers_outside_hf(tmp_path / "pimoe_export") == ["pimoe_export/export/probe.py:2"]
