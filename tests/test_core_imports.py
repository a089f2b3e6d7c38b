"""The folders are the architecture: each room may import only what docs/architecture.md allows.

Two kinds of check: a static one that reads every module's import statements (fast, names the offending line) and
a runtime one that imports the core and confirms no edge library ends up in ``sys.modules``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450
EDGE_LIBS = {"hydra", "omegaconf", "wandb", "lm_eval", "datasets", "pandas", "matplotlib", "scipy", "submitit"}
MODEL_LIBS = {"torch", "transformers", "accelerate", "safetensors", "gguf"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module_level_only: bool) -> list[tuple[int, str]]:
    """(line, imported module) for each import; ``module_level_only`` skips imports inside functions/classes."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    if module_level_only:  # module-level `if TYPE_CHECKING:`/`try:` bodies still run at import time
        nodes = [
            n for stmt in tree.body for n in ast.walk(stmt) if not isinstance(stmt, ast.FunctionDef | ast.ClassDef)
        ]
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def violations(
    folder: str, allowed_project: tuple[str, ...], forbidden_libs: set[str], module_level_only: bool = False
) -> list[str]:
    """Imports from ``folder`` of forbidden libraries, or of project modules outside ``allowed_project``."""
    bad = []
    for path in python_files(folder):
        for line, name in imports_of(path, module_level_only):
            top = name.split(".")[0]
            project = top in {"gradmap", "baselines"}
            if (top in forbidden_libs) or (project and not name.startswith(allowed_project)):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return sorted(set(bad))


def test_core_imports_only_torch_transformers_and_itself():
    # Every import, lazy ones included, except the registry's discovery of the `baselines` plug-in package.
    bad = [v for v in violations("gradmap/core", ("gradmap.core",), EDGE_LIBS) if not v.endswith("imports baselines")]
    assert bad == []


def test_baselines_import_only_the_core():
    assert violations("baselines", ("gradmap.core", "baselines"), EDGE_LIBS) == []


def test_report_reads_files_and_never_imports_model_code():
    allowed = (
        "gradmap.report",
        "gradmap.results",
        "gradmap.sweep",
        "gradmap.eval.tasks",
        "gradmap.eval.items",
        "gradmap.paths",
    )
    assert violations("gradmap/report", allowed, MODEL_LIBS, module_level_only=True) == []


def test_bench_uses_only_the_core():
    allowed = ("gradmap.bench", "gradmap.core", "baselines", "gradmap.models")  # models: the cpu preset loads SmolLM2
    assert violations("gradmap/bench", allowed, EDGE_LIBS - {"scipy"}) == []


def test_no_module_level_import_cycle():
    files = python_files("gradmap", "baselines")
    names = {module_name(p): p for p in files}
    graph = {
        name: {
            target
            for _, imported in imports_of(path, module_level_only=True)
            for target in (imported, imported.rsplit(".", 1)[0])
            if target in names and target != name
        }
        for name, path in names.items()
    }
    # A package's __init__ importing its own submodules is how packages re-export; only count edges between
    # modules where neither is a package ancestor of the other.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not (t.startswith(name + ".") or name.startswith(t + "."))}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend([*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt])
                return True
            if nxt not in state and visit(nxt, [*stack, nxt]):
                return True
        state[node] = 2
        return False

    for start in sorted(graph):
        if start not in state and visit(start, [start]):
            break
    assert cycle == [], " -> ".join(cycle)


@pytest.mark.parametrize("path", python_files("gradmap", "baselines"), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_at_most_450_lines(path: Path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (split it by job)"


def test_the_checker_catches_a_forbidden_import(tmp_path, monkeypatch):
    """The rules above can fail: a planted core module importing hydra and the pipeline is reported."""
    fake_root = tmp_path
    (fake_root / "gradmap" / "core").mkdir(parents=True)
    (fake_root / "gradmap" / "core" / "bad.py").write_text("import hydra\nfrom gradmap.pipeline import Job\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    bad = violations("gradmap/core", ("gradmap.core",), EDGE_LIBS)
    assert any("imports hydra" in b for b in bad) and any("gradmap.pipeline" in b for b in bad)


CORE = [
    "gradmap",
    "gradmap.core.prune",
    "gradmap.core.layers",
    "gradmap.core.calib",
    "gradmap.core.stage1",
    "gradmap.core.stage2",
    "gradmap.models",
    "gradmap.core.timing",
    "gradmap.eval.perplexity",
    "gradmap.eval.speed",
    "gradmap.bench",
    "baselines",
]


def test_core_modules_import_no_edge_library():
    # scipy is left out here: transformers' model loading imports it itself (gradmap.models -> transformers).
    code = (
        f"import importlib, sys\nfor m in {CORE!r}: importlib.import_module(m)\n"
        "from gradmap.core.components import METHODS; METHODS.names()\n"
        f"print(','.join(m for m in {sorted(EDGE_LIBS - {'scipy'})!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"core pulled in edge libraries: {out.stdout.strip()}"
