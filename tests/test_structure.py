"""The house's shape, held by a test: no import cycle (top-level or inside functions), no class over
200 lines, no function over 80 (literal manifests aside), the trainer's concerns in their folders.
The README's architecture section names the same folders."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "infra")
# Functions that are one literal Kubernetes manifest (a dict a reader compares with the API reference).
LITERAL_MANIFESTS = {"infra/rendezvous.py:etcd_manifests"}
TRAINER_FOLDERS = {"data", "dev", "model", "monitor", "post", "runtime", "train"}
TRAINER_TOP_MODULES = {"__init__", "__main__", "atomic", "cli", "config", "envvars", "errors"}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every import of a project module, wherever it is in the file (a lazy import still ties them)."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    target = full if full in modules else node.module
                    if target in modules and target != name:
                        edges[name].add(target)
            elif isinstance(node, ast.Import):
                edges[name] |= {a.name for a in node.names if a.name in modules and a.name != name}
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle, as the modules along it; [] when there is none."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return []

    for start in sorted(edges):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return []


def test_no_import_cycle():
    assert _cycle(_imports(_modules())) == []


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_no_class_over_200_lines_and_no_function_over_80():
    too_long = []
    for path in _modules().values():
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1 if hasattr(node, "lineno") else 0
            if isinstance(node, ast.ClassDef) and lines > 200:
                too_long.append(f"{rel}:{node.lineno} class {node.name}: {lines} lines")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > 80 \
                    and f"{rel}:{node.name}" not in LITERAL_MANIFESTS:
                too_long.append(f"{rel}:{node.lineno} {node.name}(): {lines} lines")
    assert too_long == []


def test_the_trainer_is_organised_by_concern():
    trainer = ROOT / "trainer"
    folders = {p.name for p in trainer.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in trainer.glob("*.py")}
    assert folders == TRAINER_FOLDERS
    assert modules == TRAINER_TOP_MODULES
    readme = (ROOT / "README.md").read_text()
    assert all(f"  {name}/" in readme for name in TRAINER_FOLDERS)  # the architecture section names each


def test_post_training_and_fixtures_stay_apart():
    """post/ reads final/ (or a checkpoint, through its reader) from disk and never imports the loop;
    nothing in the product imports the development fixtures but the demo itself."""
    edges = _imports(_modules())
    post = {t for m, ts in edges.items() if m.startswith("trainer.post") for t in ts}
    assert {t for t in post if t.startswith("trainer.train")} <= {"trainer.train.checkpoint"}
    dev_users = {m for m, ts in edges.items() for t in ts if t.startswith("trainer.dev") and not m.startswith("trainer.dev")}
    assert dev_users == set()
