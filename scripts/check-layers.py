#!/usr/bin/env python3
"""Checks that imports under src/ do not run up the layers (ARCHITECTURE.md, "Layers").

Layers, lowest first (a module may import its own layer and those below it):

    durable, heartbeat, events, test_hooks  <  dicom  <  series  <  result  <  inference
                                <  report  <  pacs  <  alert
                        <  service, config, synth, cli  <  main.rs

`heartbeat` (the stage liveness handle), `test_hooks` (switches only tests set, read
once by `serve`) and `result` (the result contract and the message inference sends to
alert) sit below the stages that use them. `config` gathers every stage's config
section, `service`'s included, so it shares the service layer; `synth` and `cli` (the
command-line tools) are tool modules that no stage may import. `lib.rs` only declares modules.

Two rules, each reported as `file:line: message` (exit 1 when any is broken):
1. a file of module M refers to `crate::N...` (or `super::` up to N) where N's layer is
   above M's;
2. two sibling files of one module (e.g. src/alert/mqtt.rs and src/alert/wire.rs; the
   module's own mod.rs does not count) refer to each other, through `super::x`,
   `crate::m::x` or `self::`-free paths that resolve to the sibling.

Paths are read from code, not comments: `use` statements (brace groups included) and
inline `crate::x::` paths. `super::` inside an inline `mod tests { ... }` first climbs
out of that inline module. A top-level module missing from LAYERS is an error, so a new
module gets a place in the order.

    python3 scripts/check-layers.py        # exit 0 and "layers: ok (...)" when clean
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

LAYERS = [
    ["durable", "heartbeat", "events", "test_hooks"],
    ["dicom"],
    ["series"],
    ["result"],
    ["inference"],
    ["report"],
    ["pacs"],
    ["alert"],
    ["service", "config", "synth", "cli"],
    ["main"],
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
SKIP = {"lib"}

STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])\'')
INLINE_MOD = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*\{")
PATH = re.compile(r"\b((?:crate|super|self)(?:::\w+)*)(::\{)?")


def module_path(path):
    """src/alert/mqtt.rs -> ['alert', 'mqtt']; src/alert/mod.rs -> ['alert']."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "mod":
        parts.pop()
    return parts


def code_lines(text):
    """(line number, code without comments and string contents, inline-module depth)."""
    depth = 0
    inline = []  # brace depths at which an inline module opened
    in_block_comment = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw
        if in_block_comment:
            if "*/" not in line:
                continue
            line = line.split("*/", 1)[1]
            in_block_comment = False
        line = STRING.sub('""', line)
        line = line.split("//", 1)[0]
        if "/*" in line:
            line, _, rest = line.partition("/*")
            in_block_comment = "*/" not in rest
        opens_inline = bool(INLINE_MOD.match(line))
        yield number, line, len(inline)
        if opens_inline:
            inline.append(depth)
        depth += line.count("{") - line.count("}")
        while inline and depth <= inline[-1]:
            inline.pop()


def expand_groups(statement):
    """`crate::a::{b, c::{d, e}}` -> ['crate::a::b', 'crate::a::c::d', 'crate::a::c::e']."""
    statement = re.sub(r"\s+", "", re.sub(r"\s+as\s+", "@", statement))

    def expand(prefix, body):
        out, level, start = [], 0, 0
        items = []
        for i, ch in enumerate(body):
            if ch == "{":
                level += 1
            elif ch == "}":
                level -= 1
            elif ch == "," and level == 0:
                items.append(body[start:i])
                start = i + 1
        items.append(body[start:])
        for item in filter(None, items):
            if "::{" in item and item.endswith("}"):
                head, _, rest = item.partition("::{")
                out += expand(prefix + head + "::", rest[:-1])
            else:
                out.append(prefix + item)
        return out

    return expand("", statement)


def references(path):
    """(line, absolute module path as a list) for each crate-internal path in `path`."""
    here = module_path(path)
    text = path.read_text(encoding="utf-8")
    pending, pending_line, pending_inline = None, 0, 0
    for number, line, inline in code_lines(text):
        paths = []
        if pending is not None or re.match(r"^\s*(?:pub(?:\([^)]*\))?\s+)?use\b", line):
            if pending is None:
                pending, pending_line, pending_inline = "", number, inline
                line = re.sub(r"^\s*(?:pub(?:\([^)]*\))?\s+)?use\b", "", line, count=1)
            pending += line
            if ";" not in pending:
                continue
            statement, _, line = pending.partition(";")
            pending = None
            for item in expand_groups(statement):
                item = re.sub(r"::self$", "", item.split("@")[0])
                if re.match(r"^(crate|super|self)\b", item):
                    paths.append((pending_line, pending_inline, item))
        for match in PATH.finditer(line):
            if match.group(2):
                continue  # a brace group outside `use` (rare); its head alone says little
            paths.append((number, inline, match.group(1)))
        for number_, inline_, item in paths:
            segments = [s for s in item.split("::") if s]
            resolved = resolve(here, inline_, segments)
            if resolved is not None:
                yield number_, resolved


def resolve(here, inline, segments):
    if segments[0] == "crate":
        return segments[1:]
    # `self::`/`super::` start from the file's own module path (src/alert/mqtt.rs is
    # alert::mqtt; src/alert/mod.rs is alert).
    base = list(here)
    if segments[0] == "self":
        return base + segments[1:] if inline == 0 else None
    supers = 0
    while supers < len(segments) and segments[supers] == "super":
        supers += 1
    supers -= inline
    if supers <= 0:
        return None  # climbs only out of an inline module: this file itself
    if supers > len(base):
        return None
    return base[: len(base) - supers] + segments[supers + inline:]


def main():
    problems = []
    edges = {}  # (dir module path, file stem) -> {sibling stem: first line}
    files = sorted(SRC.rglob("*.rs"))
    for path in files:
        here = module_path(path)
        top = here[0]
        if top in SKIP:
            continue
        rel = path.relative_to(ROOT)
        if top not in RANK:
            problems.append(f"{rel}:1: module `{top}` has no layer: add it to LAYERS in "
                            "scripts/check-layers.py and to ARCHITECTURE.md")
            continue
        parent = here[:-1]
        is_mod_file = path.name == "mod.rs" or path.parent == SRC
        siblings = {p.stem if p.is_file() else p.name
                    for p in path.parent.iterdir()
                    if (p.suffix == ".rs" and p.name != "mod.rs") or p.is_dir()}
        for line, target in references(path):
            if not target:
                continue
            other = target[0]
            if other in RANK and RANK[other] > RANK[top]:
                problems.append(
                    f"{rel}:{line}: `{top}` imports `crate::{'::'.join(target)}`, "
                    f"but `{other}` is a higher layer than `{top}`")
            if (not is_mod_file and len(target) > len(parent)
                    and target[: len(parent)] == parent
                    and target[len(parent)] in siblings
                    and target[len(parent)] != here[-1]):
                edges.setdefault((tuple(parent), here[-1]), {}).setdefault(
                    target[len(parent)], (rel, line))
    for (parent, stem), targets in sorted(edges.items()):
        for other, (rel, line) in sorted(targets.items()):
            back = edges.get((parent, other), {}).get(stem)
            if back and stem < other:
                back_rel, back_line = back
                problems.append(
                    f"{rel}:{line}: cycle in `{'::'.join(parent) or 'crate'}`: `{stem}` imports "
                    f"`{other}` and `{other}` imports `{stem}` ({back_rel}:{back_line})")
    for problem in problems:
        print(problem)
    if problems:
        print(f"layers: {len(problems)} problem(s); order: "
              + " < ".join(", ".join(names) for names in LAYERS), file=sys.stderr)
        return 1
    print(f"layers: ok ({len(files)} files; order: "
          + " < ".join(", ".join(names) for names in LAYERS) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
