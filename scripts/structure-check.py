#!/usr/bin/env python3
"""House limits on the code under src/ (issue #15), checked by `make test`.

- no file over 800 lines, tests excluded (a `#[cfg(test)] mod … { … }` block at the
  end of a file and `*_tests.rs` / `tests.rs` files do not count);
- no function over 80 lines, tests excluded;
- no import cycle between the crate's top-level modules (`use crate::x` edges).

Exit status 1 with one line per violation; `--list` prints the measurements.
"""

import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
MAX_FILE = 800
MAX_FN = 80

FN_RE = re.compile(
    r"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:default\s+)?(?:const\s+)?(?:async\s+)?"
    r"(?:unsafe\s+)?(?:extern\s+\"[^\"]*\"\s+)?fn\s+([A-Za-z_][A-Za-z0-9_]*)"
)


def strip_code(line, state):
    """Removes string/char literals and comments from one line; `state` carries
    block-comment and raw-string state across lines."""
    out = []
    i = 0
    n = len(line)
    while i < n:
        if state["block"]:
            j = line.find("*/", i)
            if j < 0:
                return "".join(out)
            state["block"] = False
            i = j + 2
            continue
        if state["raw"] is not None:
            j = line.find(state["raw"], i)
            if j < 0:
                return "".join(out)
            i = j + len(state["raw"])
            state["raw"] = None
            out.append('""')
            continue
        if state["str"]:
            while i < n:
                c = line[i]
                if c == "\\":
                    i += 2
                    continue
                if c == '"':
                    state["str"] = False
                    i += 1
                    out.append('""')
                    break
                i += 1
            continue
        c = line[i]
        if line.startswith("//", i):
            break
        if line.startswith("/*", i):
            state["block"] = True
            i += 2
            continue
        m = re.match(r'b?r(#*)"', line[i:])
        if m and (i == 0 or not (line[i - 1].isalnum() or line[i - 1] == "_")):
            state["raw"] = '"' + m.group(1)
            i += m.end()
            continue
        if c == '"':
            state["str"] = True
            i += 1
            continue
        if c == "'":
            # char literal ('x', '\n', '\u{..}') versus a lifetime ('a)
            m = re.match(r"'(\\.[^']*|[^'\\])'", line[i:])
            if m:
                out.append("' '")
                i += m.end()
                continue
        out.append(c)
        i += 1
    return "".join(out)


def code_lines(path):
    state = {"block": False, "raw": None, "str": False}
    with open(path, encoding="utf-8") as f:
        raw = f.read().split("\n")
    return raw, [strip_code(l, state) for l in raw]


def test_ranges(raw, code):
    """Line ranges (0-based, inclusive) of `#[cfg(test)]` items."""
    ranges = []
    i = 0
    while i < len(code):
        if code[i].strip().startswith("#[cfg(test)]"):
            # the item: from here to the end of its braces (or `;` for `mod x;`)
            depth = 0
            opened = False
            j = i
            while j < len(code):
                for c in code[j]:
                    if c == "{":
                        depth += 1
                        opened = True
                    elif c == "}":
                        depth -= 1
                if (opened and depth <= 0) or (not opened and code[j].rstrip().endswith(";")):
                    break
                j += 1
            ranges.append((i, j))
            i = j + 1
            continue
        i += 1
    return ranges


def in_ranges(k, ranges):
    return any(a <= k <= b for a, b in ranges)


def functions(code, skip):
    """(name, first line, length) of every fn body outside `skip`."""
    out = []
    for i, line in enumerate(code):
        if in_ranges(i, skip):
            continue
        m = FN_RE.match(line)
        if not m:
            continue
        depth = 0
        opened = False
        j = i
        done = False
        while j < len(code) and not done:
            for c in code[j]:
                if c == "{":
                    depth += 1
                    opened = True
                elif c == "}":
                    depth -= 1
                    if opened and depth == 0:
                        done = True
                        break
                elif c == ";" and not opened and depth == 0:
                    done = True  # a declaration without a body (trait method)
                    break
            if not done:
                j += 1
        if opened:
            out.append((m.group(1), i + 1, j - i + 1))
    return out


def is_test_file(rel):
    base = os.path.basename(rel)
    return base.endswith("_tests.rs") or base == "tests.rs" or "/tests/" in rel


def top_module(rel):
    parts = rel[:-3].split(os.sep)
    if parts[0] in ("lib", "main"):
        return None
    return parts[0]


USE_RE = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")


def main():
    listing = "--list" in sys.argv
    problems = []
    edges = {}
    for dirpath, _, files in os.walk(ROOT):
        for name in sorted(files):
            if not name.endswith(".rs"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, ROOT)
            raw, code = code_lines(path)
            if is_test_file(rel):
                continue
            skip = test_ranges(raw, code)
            counted = sum(1 for k in range(len(raw)) if not in_ranges(k, skip))
            if listing:
                print(f"{counted:6d} {rel}")
            if counted > MAX_FILE:
                problems.append(f"src/{rel}: {counted} lines outside tests (limit {MAX_FILE})")
            for fname, line, length in functions(code, skip):
                if length > MAX_FN:
                    problems.append(
                        f"src/{rel}:{line}: fn {fname} is {length} lines (limit {MAX_FN})"
                    )
            me = top_module(rel)
            if me is None:
                continue
            for k, line in enumerate(code):
                if in_ranges(k, skip):
                    continue
                for m in USE_RE.finditer(line):
                    other = m.group(1)
                    if other != me:
                        edges.setdefault(me, set()).add(other)
    # cycles between top-level modules (Tarjan's SCCs)
    index = {}
    low = {}
    stack = []
    on = set()
    sccs = []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            strong(v)
    for comp in sccs:
        detail = "; ".join(
            f"{a} → {', '.join(sorted(b for b in edges.get(a, ()) if b in comp))}" for a in comp
        )
        problems.append(f"import cycle between modules {{{', '.join(comp)}}}: {detail}")
    for p in problems:
        print(p)
    if problems:
        print(f"structure check: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print("structure check: every file ≤ 800 lines, every function ≤ 80 lines, no import cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
