#!/usr/bin/env python3
"""Refuses I/O, clocks, timers and spawns in the sans-IO core modules, outside their tests.

The cores (relay/server/src/core, node-client/src/core) take `now` as a parameter and leave
sockets and tasks to the shells around them. A file's `#[cfg(test)]` module (last in the file,
by the project's style) and the tests' own helpers (`testing.rs`) are not checked.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORES = ["relay/server/src/core", "node-client/src/core"]
FORBIDDEN = [
    (r"\bInstant::now\b", "reads the clock: take `now` as a parameter"),
    (r"\bSystemTime::now\b", "reads the clock: take the time as a parameter"),
    (r"\btokio::time\b", "uses a timer: return a deadline from poll_timeout"),
    (r"\btokio::spawn\b|\bspawn_blocking\b", "spawns a task: the shell owns tasks"),
    (r"\btokio::net\b|\bstd::net::(TcpStream|TcpListener|UdpSocket)\b", "touches a socket"),
    (r"\bstd::thread::sleep\b|\bthread::sleep\b", "blocks the thread"),
    (r"\btokio::fs\b|\bstd::fs\b", "touches the file system"),
]


def checked_part(text: str) -> str:
    cut = re.search(r"^#\[cfg\(test\)\]\s*\n(#\[[^\n]*\]\s*\n)*mod tests\b", text, re.M)
    return text[: cut.start()] if cut else text


def main() -> int:
    problems = []
    files = 0
    for core in CORES:
        for path in sorted((ROOT / core).rglob("*.rs")):
            if path.name == "testing.rs":
                continue
            files += 1
            for n, line in enumerate(checked_part(path.read_text()).splitlines(), 1):
                code = line.split("//", 1)[0]
                for pattern, why in FORBIDDEN:
                    if re.search(pattern, code):
                        problems.append(f"{path.relative_to(ROOT)}:{n}: {why}: {line.strip()}")
    if files == 0:
        print("check-sans-io: no core files found", file=sys.stderr)
        return 1
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    print(f"check-sans-io: {files} core files free of clocks, timers, spawns and sockets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
