"""Every stage in ``dvc.yaml`` depends on all project code its command can import.

A stage whose code changes must re-run; DVC only knows that if the changed file is under one of
the stage's ``deps``. The check follows every ``import`` statement (also those inside functions,
which run lazily) from the stage's entry module through the project packages, and fails naming
each file the stage imports that its deps do not cover.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rlhf_core", "tasks", "flows")


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path) -> set[str]:
    """Project modules named by the import statements of one file (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {m for m in found if m.split(".")[0] in PACKAGES}


def imported_files(entry_modules: list[str]) -> set[Path]:
    """Project files a process starting at ``entry_modules`` can import (with every parent package)."""
    todo, seen = list(entry_modules), set()
    files: set[Path] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        for depth in range(1, len(parts)):  # importing a.b.c runs a/__init__ and a/b/__init__
            todo.append(".".join(parts[:depth]))
        path = _module_file(module)
        if path is None:
            continue  # a name imported from a module, not a module itself
        files.add(path)
        todo.extend(_imported_modules(path))
    return files


def entry_modules(cmd: str) -> list[str]:
    """``python -m tasks.launch sft`` -> [tasks.launch, tasks.sft]: the launcher imports the stage module by name."""
    words = cmd.split()
    module = words[words.index("-m") + 1]
    entries = [module]
    if module == "tasks.launch":
        entries.append(f"tasks.{words[-1]}")
    return entries


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d.rstrip("/") or rel.startswith(d.rstrip("/") + "/") for d in deps)


def missing_deps(dag: dict) -> dict[str, list[str]]:
    """{stage: [imported project files its deps do not cover]} for every stage with gaps."""
    gaps = {}
    for name, stage in dag["stages"].items():
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
        uncovered = sorted(p.relative_to(ROOT).as_posix() for p in imported_files(entry_modules(stage["cmd"])) if not _covered(p, deps))
        if uncovered:
            gaps[name] = uncovered
    return gaps


@pytest.fixture(scope="module")
def dag() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_every_stage_depends_on_all_the_project_code_it_imports(dag):
    assert missing_deps(dag) == {}, "dvc.yaml deps miss code these stages import (add the files or their folders)"


def test_the_check_fails_when_a_dependency_is_removed(dag):
    broken = copy.deepcopy(dag)
    broken["stages"]["sft"]["deps"] = [d for d in broken["stages"]["sft"]["deps"] if d != "rlhf_core/trainers/sft.py"]
    assert "rlhf_core/trainers/sft.py" in missing_deps(broken).get("sft", [])
    # ...and a lazily imported module counts: tasks.launch imports the stage module by name only
    broken = copy.deepcopy(dag)
    broken["stages"]["sft"]["deps"] = [d for d in broken["stages"]["sft"]["deps"] if d != "tasks/sft.py"]
    assert "tasks/sft.py" in missing_deps(broken).get("sft", [])


def test_imports_inside_functions_are_followed():
    files = {p.relative_to(ROOT).as_posix() for p in imported_files(["tasks.prepare"])}
    assert "rlhf_core/synthetic/generator.py" in files  # imported inside build_splits
    assert "tasks/tracking/stage_run.py" in files  # through stage_main's lazy import
