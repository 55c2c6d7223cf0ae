#!/usr/bin/env python3
"""Checks the shape of the server crates: no import circles between their modules, and the
assembler (`server.rs`) imported by no module.

A module here is a top-level file or folder of a crate's `src/` (`core/` and `io/` count as one
module each). An edge A -> B is a `use crate::B` or a `crate::B::` path in A outside its tests.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRATES = {"relay/server/src": "server", "edge/server/src": "server", "node-client/src": None}
ENTRY = {"lib", "main"}


def module_of(src: pathlib.Path, path: pathlib.Path) -> str:
    rel = path.relative_to(src)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def without_tests(text: str) -> str:
    cut = re.search(r"^#\[cfg\(test\)\]\s*\n(#\[[^\n]*\]\s*\n)*mod tests\b", text, re.M)
    return text[: cut.start()] if cut else text


def edges(src: pathlib.Path) -> dict:
    graph = {}
    for path in sorted(src.rglob("*.rs")):
        m = module_of(src, path)
        if m in ENTRY or path.name == "testing.rs":
            continue
        lines = without_tests(path.read_text()).splitlines()
        text = "\n".join(line.split("//", 1)[0] for line in lines)
        targets = set(re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", text))
        for block in re.findall(r"\buse crate::\{([^;]*)\}", text, re.S):
            targets |= set(re.findall(r"(?:^|[,{\s])([a-z_][a-z0-9_]*)", block))
        known = {t for t in targets if (src / f"{t}.rs").exists() or (src / t).is_dir()}
        graph.setdefault(m, set()).update(known - {m})
    return graph


def cycle(graph: dict):
    state = {}

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for t in sorted(graph.get(n, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t, stack)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n, [])
            if found:
                return found
    return None


def main() -> int:
    bad = 0
    for rel, assembler in CRATES.items():
        src = ROOT / rel
        graph = edges(src)
        if not graph:
            print(f"check-layout: no modules found in {rel}", file=sys.stderr)
            return 1
        found = cycle(graph)
        if found:
            print(f"{rel}: import circle: {' -> '.join(found)}", file=sys.stderr)
            bad += 1
        if assembler:
            users = sorted(m for m, ts in graph.items() if assembler in ts)
            if users:
                print(f"{rel}: {', '.join(users)} import the assembler {assembler}.rs", file=sys.stderr)
                bad += 1
        if not found:
            print(f"check-layout: {rel}: {len(graph)} modules, no circle")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
