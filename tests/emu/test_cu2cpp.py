"""plugins/emu/tools/cu2cpp.py, the CUDA-to-C++ rewriter the emulated GPU is built from: each construct it rewrites,
written out by hand as the emulator's runtime spells it, and the declarations it must refuse with its own message
(not with C++ that fails to compile later, far from the cause)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "plugins" / "emu" / "tools" / "cu2cpp.py"


def rewrite(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    src, dst = tmp_path / "k.cu", tmp_path / "k.cpp"
    src.write_text(source)
    done = subprocess.run([sys.executable, str(TOOL), str(src), str(dst)], capture_output=True, text=True,
                          timeout=60)
    if done.returncode == 0:
        done.stdout = dst.read_text()
    return done


@pytest.mark.parametrize(("cuda", "cpp"), [
    ("extern __shared__ float smem[];", "float* smem = ::emu::dynamic_shared<float>();"),
    ("__shared__ __align__(16) float tile[32][33];",
     'static char emu_shk_tile; auto& tile = ::emu::shared_ref<float[32][33], 16>(&emu_shk_tile, "tile");'),
    ("__shared__ Pair<int, float> p[4];",  # a comma inside template brackets is part of the type
     'static char emu_shk_p; auto& p = ::emu::shared_ref<Pair<int, float>[4], 0>(&emu_shk_p, "p");'),
    ("__shared__ int count;", 'static char emu_shk_count; auto& count = ::emu::shared_ref<int, 0>(&emu_shk_count, '
                              '"count");'),
    ("k<<<dim3(n, 1), 128, 64, st>>>(x, n);",
     '::emu::launch(::emu::cfg(dim3(n, 1), 128, 64, st), "k", __FILE__, __LINE__, k, x, n);'),
    ("k<<<g, b>>>();", '::emu::launch(::emu::cfg(g, b), "k", __FILE__, __LINE__, k);'),
])
def test_each_construct_is_rewritten(tmp_path: Path, cuda: str, cpp: str) -> None:
    done = rewrite(tmp_path, f"__global__ void f() {{\n  {cuda}\n}}\n")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f'#line 1 "{tmp_path / "k.cu"}"'  # diagnostics point at the CUDA source
    assert lines[1:] == ["__global__ void f() {", f"  {cpp}", "}"]


@pytest.mark.parametrize(("cuda", "message"), [
    ("__shared__ int a, b;", "line 3: one __shared__ declaration declares several variables"),
    ("__shared__ float a[2], b[2];", "line 3: unsupported __shared__ declaration"),
    ("__shared__ Pair<int, float> a, b;", "line 3: one __shared__ declaration declares several variables"),
    ('asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 %1, %0;" : "=f"(d) : "f"(a));',
     "operands must appear as %0..%n in order"),
    ('asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 %0, %1;" : "=f"(d) : a);',
     "cannot read asm operand"),
    ("k<<<g, b>>> x;", "expected ( after >>>"),
])
def test_what_it_cannot_rewrite_is_refused_by_name(tmp_path: Path, cuda: str, message: str) -> None:
    done = rewrite(tmp_path, f"// kernel\n__global__ void f() {{\n  {cuda}\n}}\n")
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "k.cpp").exists()  # nothing half-written for the build to pick up


def test_inline_ptx_it_does_not_emulate_fails_the_build_naming_the_opcode(tmp_path: Path) -> None:
    """Unknown PTX becomes a static_assert at its place: the C++ build stops there, naming the instruction."""
    done = rewrite(tmp_path, '__global__ void f() {\n  asm volatile("bar.sync 0;");\n}\n')
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[2] == '  static_assert(false, "cu2cpp: inline PTX not emulated: bar.sync");'


def test_known_ptx_becomes_the_emulators_function_with_outputs_then_inputs(tmp_path: Path) -> None:
    done = rewrite(tmp_path, '__global__ void f() {\n  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 '
                             '{%0, %1}, {%2}, {%3};" : "=r"(d[0]), "=r"(d[1]) : "r"(a[0]), "r"(b));\n}\n')
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[2] == "  ::emu::ptx::mma_m16n8k32_s32_s8_s8_s32(d[0], d[1], a[0], b);"
