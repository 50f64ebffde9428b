#!/usr/bin/env python3
"""Rewrite a CUDA source into C++ for cuda_emu (the original is never modified).

  k<<<g, b[, smem[, stream]]>>>(args)  ->  ::emu::launch(::emu::cfg(g, b, ...), "k", __FILE__, __LINE__, k, args)
  extern __shared__ T x[];             ->  T* x = ::emu::dynamic_shared<T>();
  __shared__ [__align__(N)] T x[..];   ->  static char emu_shk_x;
                                          auto& x = ::emu::shared_ref<T[..], N>(&emu_shk_x, "x");
  asm volatile("mma.sync... " : outs : ins)  ->  ::emu::ptx::<function>(outs..., ins...)   (known opcodes only)

Usage: cu2cpp.py IN.cu OUT.cpp
"""
import re
import sys

PTX = {
    "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32": "::emu::ptx::mma_m16n8k16_f32_f16_f16_f32",
    "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32": "::emu::ptx::mma_m16n8k32_s32_s8_s8_s32",
}


def match_forward(s, i, open_c, close_c):
    """s[i] == open_c; index just past the matching close_c (skips string/char literals)."""
    depth = 0
    j = i
    while j < len(s):
        c = s[j]
        if c in "\"'":
            q = c
            j += 1
            while j < len(s) and s[j] != q:
                j += 2 if s[j] == "\\" else 1
        elif c == open_c:
            depth += 1
        elif c == close_c:
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    raise SystemExit(f"cu2cpp: unbalanced {open_c} at offset {i}")


def split_top(s):
    out, depth, cur, j = [], 0, "", 0
    while j < len(s):
        c = s[j]
        if c in "\"'":
            q = c
            k = j + 1
            while k < len(s) and s[k] != q:
                k += 2 if s[k] == "\\" else 1
            cur += s[j:k + 1]
            j = k + 1
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += c
        j += 1
    if cur.strip():
        out.append(cur)
    return out


def rewrite_launches(s):
    out, pos = [], 0
    while True:
        i = s.find("<<<", pos)
        if i < 0:
            out.append(s[pos:])
            return "".join(out)
        # kernel expression: identifier/:: chain, optionally followed by a template argument list
        k = i
        while k > 0 and s[k - 1].isspace():
            k -= 1
        if s[k - 1] == ">":
            depth, k = 0, k - 1
            while k >= 0:
                if s[k] == ">":
                    depth += 1
                elif s[k] == "<":
                    depth -= 1
                    if depth == 0:
                        break
                k -= 1
        while k > 0 and (s[k - 1].isalnum() or s[k - 1] in "_:"):
            k -= 1
        kernel = s[k:i].strip()
        j = s.find(">>>", i)
        config = s[i + 3:j]
        p = j + 3
        while s[p].isspace():
            p += 1
        if s[p] != "(":
            raise SystemExit(f"cu2cpp: expected ( after >>> at offset {p}")
        q = match_forward(s, p, "(", ")")
        args = s[p + 1:q - 1]
        name = re.sub(r"\s+", " ", kernel)
        rest = (", " + args) if args.strip() else ""
        call = f'::emu::launch(::emu::cfg({config}), "{name}", __FILE__, __LINE__, {kernel}{rest})'
        out.append(s[pos:k])
        out.append(call)
        pos = q


DYN = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?([A-Za-z_][\w:<>, ]*?)\s+([A-Za-z_]\w*)\s*\[\s*\]\s*;")
STAT = re.compile(
    r"__shared__\s+(?:__align__\s*\(\s*(\d+)\s*\)\s*)?([A-Za-z_][\w:<>, ]*?)\s+([A-Za-z_]\w*)\s*((?:\[[^\]]*\]\s*)*);")


def top_level_comma(typ):
    """Whether ``typ`` has a comma outside template brackets (``Pair<int, float>`` has none)."""
    depth = 0
    for c in typ:
        depth += {"<": 1, ">": -1}.get(c, 0)
        if c == "," and depth == 0:
            return True
    return False


def rewrite_shared(s):
    s = DYN.sub(lambda m: f"{m.group(1)}* {m.group(2)} = ::emu::dynamic_shared<{m.group(1)}>();", s)

    def stat(m):
        align, typ, name, dims = m.group(1) or "0", m.group(2), m.group(3), m.group(4).strip()
        if top_level_comma(typ):  # `__shared__ int a, b;`: the pattern would read `int a,` as the type
            line = s.count("\n", 0, m.start()) + 1
            raise SystemExit(f"cu2cpp: line {line}: one __shared__ declaration declares several variables "
                             f"(declare one variable per statement: `__shared__ T name[...];`): {m.group(0).strip()}")
        return (f"static char emu_shk_{name}; "
                f'auto& {name} = ::emu::shared_ref<{typ}{dims}, {align}>(&emu_shk_{name}, "{name}");')

    s = STAT.sub(stat, s)
    for number, line in enumerate(s.splitlines(), 1):
        code = line.split("//", 1)[0]
        if re.search(r"\b__shared__\b", code):
            raise SystemExit(f"cu2cpp: line {number}: unsupported __shared__ declaration (declare one variable per "
                             f"statement: `__shared__ T name[...];`): {line.strip()}")
    return s


ASM = re.compile(r"\basm\s*(?:volatile\s*)?\(")


def rewrite_asm(s):
    out, pos = [], 0
    for m in list(ASM.finditer(s)):
        if m.start() < pos:
            continue
        p = m.end() - 1
        q = match_forward(s, p, "(", ")")
        body = s[p + 1:q - 1]
        parts = []  # template : outputs : inputs (colons outside strings/parens)
        depth, cur, j = 0, "", 0
        while j < len(body):
            c = body[j]
            if c == '"':
                k = j + 1
                while body[k] != '"':
                    k += 2 if body[k] == "\\" else 1
                cur += body[j:k + 1]
                j = k + 1
                continue
            if c in "([":
                depth += 1
            elif c in ")]":
                depth -= 1
            if c == ":" and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += c
            j += 1
        parts.append(cur)
        template = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', parts[0]))
        opcode = template.strip().split()[0] if template.strip() else ""
        fn = PTX.get(opcode)
        out.append(s[pos:m.start()])
        if fn is None:
            shown = opcode.replace('"', "")
            out.append(f'static_assert(false, "cu2cpp: inline PTX not emulated: {shown}")')
        else:
            refs = [int(x) for x in re.findall(r"%(\d+)", template)]
            if refs != sorted(refs) or refs != list(range(len(refs))):
                raise SystemExit(f"cu2cpp: {opcode} operands must appear as %0..%n in order")
            ops = []
            for sec in parts[1:3]:
                for o in split_top(sec):
                    mm = re.match(r'\s*"[=+&]*[a-z]+"\s*\((.*)\)\s*$', o, re.S)
                    if not mm:
                        raise SystemExit(f"cu2cpp: cannot read asm operand {o!r}")
                    ops.append(mm.group(1))
            out.append(f"{fn}({', '.join(ops)})")
        pos = q
    out.append(s[pos:])
    return "".join(out)


def main():
    src, dst = sys.argv[1], sys.argv[2]
    with open(src) as f:
        s = f.read()
    s = rewrite_asm(rewrite_shared(rewrite_launches(s)))
    with open(dst, "w") as f:
        f.write(f'#line 1 "{src}"\n')
        f.write(s)


if __name__ == "__main__":
    main()
