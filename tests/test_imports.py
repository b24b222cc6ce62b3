"""The one-way dependency rule (docs/architecture.md), read from the import statements (nothing is imported):

- no cycle among modules through their module-level imports;
- no cycle among packages through any import, lazy ones inside functions included;
- components (data_pipeline, model, objectives, evaluation, ds_configs) never import launcher;
- the launcher's two sides stay apart: the rank side (launcher/rank/, the stage modules) never imports the
  launching process's side (launcher/driver/), the driver never imports the rank side (it reaches a stage
  module only through the registry at run time, for the in-process evaluate), and the
  shared modules (launcher/*.py, launcher/config/, the registry launcher/stages/__init__.py) import
  neither side;
- no stage module imports another stage;
- no benchmark imports a stage module (what a stage and a benchmark share is a component, or
  launcher/rank/distill_parts.py);
- no module outside tests/ is over MAX_LINES lines (past ~500 a module holds more than one concern);
- and, imported in a process of its own, the launching process's CLI loads no torch, transformers or
  DeepSpeed.

Each rule is checked on a planted violation too, so the checks can fail.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PARTS = ("launcher", "model", "objectives", "data_pipeline", "ds_configs", "evaluation", "configs")
COMPONENTS = ("model", "objectives", "data_pipeline", "ds_configs", "evaluation")
MAX_LINES = 520


def _module(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return "stablekd." + ".".join(parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(source: str, module: str, is_package: bool) -> tuple[set[str], set[str]]:
    """(module-level imports, all imports) of stablekd modules in `source`; TYPE_CHECKING blocks skipped."""
    top: set[str] = set()
    every: set[str] = set()
    package = module if is_package else module.rsplit(".", 1)[0]

    def visit(node: ast.AST, level: int) -> None:
        if _is_type_checking(node):
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("stablekd."):
                every.add(name)
                if level == 0:
                    top.add(name)
        inner = level + isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(source), 0)
    return top, every


def import_graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> modules it imports at module level, module -> every stablekd module it imports) for the
    project tree at `root`; an imported name that is not a module (a function) counts as its module."""
    sources = {
        _module(p, root): p
        for part in PARTS
        if (root / part).is_dir()
        for p in sorted((root / part).rglob("*.py"))
    }

    def resolve(name: str) -> str:
        found = name
        while found and found not in sources:
            found = found.rpartition(".")[0]
        return found or name  # a module this tree lacks (a planted test's) keeps its own name

    top, every = {}, {}
    for mod, path in sources.items():
        t, e = imports(path.read_text(), mod, path.name == "__init__.py")
        top[mod] = {r for n in t if (r := resolve(n)) and r != mod}
        every[mod] = {r for n in e if (r := resolve(n)) and r != mod}
    return top, every


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes (first = last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def package_of(module: str) -> str:
    """stablekd.launcher.stages.teacher -> launcher.stages; stablekd.launcher.driver.cli -> launcher.driver;
    stablekd.launcher.rank.engine -> launcher.rank; stablekd.model.build -> model. The launcher's shared
    modules, its config and the stage registry (launcher/stages/__init__.py, the table that the driver, CLI
    and engine read) are launcher."""
    parts = module.split(".")[1:]
    if parts[:2] == ["launcher", "stages"]:
        return "launcher.stages" if len(parts) > 2 else "launcher"
    if parts[:2] in (["launcher", "driver"], ["launcher", "rank"]):
        return ".".join(parts[:2])
    return parts[0]


# The launcher's sides: the packages each may not import (package_of names).
SIDES = {
    "launcher.driver": ("launcher.rank", "launcher.stages"),
    "launcher.rank": ("launcher.driver",),
    "launcher.stages": ("launcher.driver",),
    "launcher": ("launcher.driver", "launcher.rank", "launcher.stages"),
}


def package_graph(every: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for mod, deps in every.items():
        out.setdefault(package_of(mod), set()).update(
            package_of(d) for d in deps if package_of(d) != package_of(mod)
        )
    return out


def violations(root: Path) -> list[str]:
    """Every broken rule of the module docstring in the tree at `root`, one line each."""
    top, every = import_graph(root)
    out = []
    if cycle := find_cycle(top):
        out.append("module-level import cycle: " + " -> ".join(cycle))
    if cycle := find_cycle(package_graph(every)):
        out.append("package import cycle: " + " -> ".join(cycle))
    for mod, deps in sorted(every.items()):
        pkg = package_of(mod)
        if pkg in COMPONENTS:
            out += [
                f"component {mod} imports {d}" for d in sorted(deps) if package_of(d).startswith("launcher")
            ]
        out += [
            f"{pkg} module {mod} imports {d}" for d in sorted(deps) if package_of(d) in SIDES.get(pkg, ())
        ]
        if pkg == "launcher.stages":
            out += [f"stage {mod} imports {d}" for d in sorted(deps) if package_of(d) == "launcher.stages"]
    stages = {f"stablekd.launcher.stages.{p.stem}" for p in (root / "launcher" / "stages").glob("*.py")}
    stages.discard("stablekd.launcher.stages.__init__")
    for p in sorted((root / "benchmarks").glob("*.py")) if (root / "benchmarks").is_dir() else []:
        _, names = imports(p.read_text(), f"benchmarks.{p.stem}", False)
        out += [
            f"benchmark {p.name} imports stage {n}"
            for n in sorted(names)
            if any(n == s or n.startswith(s + ".") for s in stages)
        ]
    for part in PARTS:
        for p in sorted((root / part).rglob("*.py")) if (root / part).is_dir() else []:
            if (n := len(p.read_text().splitlines())) > MAX_LINES:
                out.append(f"{p.relative_to(root)}: {n} lines > {MAX_LINES}")
    return out


def test_the_tree_keeps_the_house_rules():
    assert violations(REPO) == []


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {
                "model/a.py": "from stablekd.model import b\n",
                "model/b.py": "from stablekd.model.a import f\n",
            },
            "module-level import cycle: stablekd.model.a -> stablekd.model.b -> stablekd.model.a",
        ),
        (
            {
                "model/a.py": "def f():\n    from stablekd.objectives import c\n",
                "objectives/c.py": "from stablekd.model.a import f\n",
            },
            "package import cycle: model -> objectives -> model",
        ),
        ({"model/a.py": "from stablekd.launcher.config import X\n"}, "component stablekd.model.a imports"),
        (
            {"launcher/stages/s.py": "def run():\n    from stablekd.launcher.driver import pipeline\n"},
            "launcher.stages module stablekd.launcher.stages.s imports stablekd.launcher.driver.pipeline",
        ),
        (
            {"launcher/stages/s.py": "from stablekd.launcher.stages import t\n", "launcher/stages/t.py": ""},
            "stage stablekd.launcher.stages.s imports stablekd.launcher.stages.t",
        ),
        (
            {"launcher/rank/e.py": "from stablekd.launcher.driver.pipeline import run\n"},
            "launcher.rank module stablekd.launcher.rank.e imports stablekd.launcher.driver.pipeline",
        ),
        (
            {
                "launcher/driver/c.py": "def f():\n    from stablekd.launcher.rank import e\n",
                "launcher/rank/e.py": "",
            },
            "launcher.driver module stablekd.launcher.driver.c imports stablekd.launcher.rank.e",
        ),
        (
            {
                "launcher/driver/c.py": "from stablekd.launcher.stages.s import run\n",
                "launcher/stages/s.py": "",
            },
            "launcher.driver module stablekd.launcher.driver.c imports stablekd.launcher.stages.s",
        ),
        (
            {"launcher/shared.py": "from stablekd.launcher.driver import pipeline\n"},
            "launcher module stablekd.launcher.shared imports stablekd.launcher.driver.pipeline",
        ),
        ({"objectives/big.py": "x = 1\n" * (MAX_LINES + 1)}, f"objectives/big.py: {MAX_LINES + 1} lines"),
        (
            {
                "launcher/stages/distill.py": "",
                "benchmarks/b.py": "from stablekd.launcher.stages.distill import f\n",
            },
            "benchmark b.py imports stage stablekd.launcher.stages.distill.f",
        ),
    ],
)
def test_a_planted_violation_is_found(tmp_path, files, expected):
    for name, text in {"launcher/driver/pipeline.py": "", "launcher/stages/__init__.py": "", **files}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = violations(tmp_path)
    assert any(v.startswith(expected) for v in found), found
    # A lazy import inside a function is no module-level cycle, and TYPE_CHECKING imports are no imports.
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "x.py").write_text("def f():\n    from stablekd.model import y\n")
    (tmp_path / "model" / "y.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from stablekd.model import x\nfrom stablekd.model import x\n"
    )
    assert not any("stablekd.model.x" in v for v in violations(tmp_path))


def test_the_launching_process_imports_no_torch():
    """`stablekd` starts every stage's ranks and checks what they will read; torch, transformers and
    DeepSpeed cost it ~2.5 s of CPU a launch, so they load only where a check needs them (a tokenizer to
    train, a DeepSpeed JSON not validated yet, a user's model directory) and a run's later launches (the
    next stage, a resume, `stablekd status`) import none of them."""
    driver = [
        f"stablekd.launcher.driver.{p.stem}" for p in sorted((REPO / "launcher" / "driver").glob("*.py"))
    ]
    code = f"import sys, importlib; [importlib.import_module(m) for m in {driver}]; print(*sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert {"torch", "transformers", "deepspeed"} & set(loaded.stdout.split()) == set()
    assert "stablekd.launcher.driver.launch" in loaded.stdout.split()
