"""The house rules of docs/architecture.md, checked: layers point down (import-linter's contracts in
.importlinter), no import cycle between any two modules (function-local imports counted), and every task
is enqueued by a name that a `<service>_task` function registers."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_the_import_layer_contracts_are_kept():
    run = subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / ".importlinter")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout and "KEPT" in run.stdout


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:  # noqa: C901 (Tarjan, in one piece)
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root) & modules)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child) & modules))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    # Function-local imports count: a circle dodged by importing inside a function is a circle all the same.
    return grimp.build_graph("marketplace", "worker_agent", exclude_type_checking_imports=True, cache_dir=None)


def test_no_two_modules_import_each_other_even_through_others(graph):
    modules = {m for m in graph.modules if m.startswith(("marketplace.", "worker_agent."))}
    assert len(modules) > 100  # the graph really holds the project
    assert _cycles(graph, modules) == []


def test_the_cycle_finder_finds_a_cycle(graph):
    """The check above can fail: a graph with one back edge added has a cycle through it."""
    back_edge = {"importer": "marketplace.jobs.models", "imported": "marketplace.jobs.services"}
    graph.add_import(**back_edge)
    try:
        cycles = _cycles(graph, {m for m in graph.modules if m.startswith("marketplace.")})
    finally:
        graph.remove_import(**back_edge)
    assert len(cycles) == 1 and {"marketplace.jobs.models", "marketplace.jobs.services"} <= set(cycles[0])


def _enqueued_names() -> set[str]:
    names = set()
    for path in (ROOT / "marketplace").rglob("*.py"):
        names |= set(re.findall(r'enqueue(?:_on_commit)?\(\s*"([\w.]+)"', path.read_text()))
    return names


def _task_functions() -> dict[str, str]:
    """{registered name: function name} of every @shared_task in the marketplace."""
    tasks = {}
    for path in (ROOT / "marketplace").rglob("tasks.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", "") == "shared_task":
                    name = next(k.value.value for k in decorator.keywords if k.arg == "name")
                    tasks[name] = node.name
    return tasks


def test_tasks_are_named_after_the_service_they_run_and_keep_their_registered_names():
    tasks = _task_functions()
    assert len(tasks) >= 9
    assert [f for f in tasks.values() if not f.endswith("_task")] == []
    assert {"jobs.split", "jobs.merge", "workunits.validate", "workunits.sweep", "workunits.expire_leases",
            "ledger.sweep", "ledger.settle_epoch", "ledger.follow_deposits", "ledger.reconcile_chain"} <= set(tasks)


def test_every_task_enqueued_by_name_or_scheduled_is_registered(settings):
    from celery import current_app

    current_app.loader.import_default_modules()
    enqueued = _enqueued_names()
    assert {"jobs.split", "jobs.merge", "workunits.validate"} <= enqueued
    scheduled = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert [name for name in sorted(enqueued | scheduled) if name not in current_app.tasks] == []
    assert set(_task_functions()) <= set(current_app.tasks)
