"""What one decoder layer of a compiled step runs: the kernels XLA emits, in order.

`layer_ops(hlo_text, marker)` reads an optimized HLO module (`Compiled.as_text()`), inlines the
command-buffer calls of its entry computation, and returns the top-level instructions between
the first two that mention `marker` (a kernel every layer runs once, e.g. the decode kernel):
one layer's launches. Each fusion is described by the opcodes of its body, so the list shows
which small kernels (norms, RoPE, merges) a layer pays for.
"""

from __future__ import annotations

import collections
import re

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
# Opcodes that launch nothing or only describe data movement inside a fusion.
_QUIET = {"parameter", "constant", "bitcast", "broadcast", "get-tuple-element", "tuple",
          "reshape", "iota", "copy-start", "copy-done"}


def computations(hlo_text: str) -> tuple[dict[str, list[tuple[str, str, str, str]]], str]:
    """name -> [(instruction, shape, opcode, rest of line)], and the entry computation's name."""
    comps, entry, current = {}, "", None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m:
                current = m.group(1)
                comps[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if m:
            comps[current].append((m.group(1), m.group(2), m.group(3), m.group(4)))
    return comps, entry


def _body(comps, name: str) -> str:
    ops = collections.Counter(op for _, _, op, _ in comps.get(name, ()) if op not in _QUIET)
    return ", ".join(f"{op}x{n}" if n > 1 else op for op, n in ops.most_common())


def launches(hlo_text: str) -> list[str]:
    """One line per top-level instruction of the entry (command-buffer calls inlined)."""
    comps, entry = computations(hlo_text)
    out = []

    def walk(name: str) -> None:
        for inst, shape, op, rest in comps.get(name, ()):
            called = _CALLS.search(rest)
            if op == "call" and called:
                walk(called.group(1))
                continue
            if op in _QUIET:
                continue
            kind = re.search(r"kind=(\w+)", rest)
            target = re.search(r'custom_call_target="([^"]+)"', rest)
            label = re.search(r'"name":"([^"]+)"', rest) or re.search(r"jaxpage_\w+", rest)
            desc = (label.group(1) if label and label.groups() else label.group(0) if label
                    else target.group(1) if target else "")
            if op == "fusion" and called:
                desc = f"{kind.group(1) if kind else ''} [{_body(comps, called.group(1))}] {desc}"
            out.append(f"{inst:32s} {op:12s} {shape[:40]:40s} {desc[:120]}")

    walk(entry)
    return out


def layer_ops(hlo_text: str, marker: str) -> list[str]:
    """The launches from the first `marker` launch up to (not including) the second."""
    lines = launches(hlo_text)
    hits = [i for i, line in enumerate(lines) if " custom-call " in line and marker in line]
    if len(hits) < 2:
        return lines
    return lines[hits[0]:hits[1]]
