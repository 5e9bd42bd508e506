"""Only marketplace/artifacts knows where blobs live: everything else uses the storage interface, so the
code runs unchanged on either backend. Checked by reading the source (ast), not by running it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from django.conf import settings

from marketplace.artifacts.storage import ArtifactStorage, FileSystemStorage, S3ObjectStorage

ROOT = Path(settings.BASE_DIR)
INTERFACE = {name for name in vars(ArtifactStorage) if not name.startswith("_")}
IMPORTABLE = {"get_storage", "ArtifactStorage", "BinaryReader"}  # what code outside artifacts/ may import


def outside_artifacts() -> list[Path]:
    files = [*ROOT.glob("marketplace/**/*.py"), *ROOT.glob("bench/**/*.py")]
    return sorted(f for f in files if "marketplace/artifacts/" not in f.as_posix())


def _is_get_storage(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "get_storage"


def _storage_names(tree: ast.AST) -> set[str]:
    """Names bound to get_storage(): `storage = get_storage()` and `kind, storage = ..., get_storage()`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = zip(target.elts, node.value.elts) if isinstance(target, ast.Tuple) and isinstance(
                    node.value, ast.Tuple) else [(target, node.value)]
                names |= {t.id for t, v in pairs if isinstance(t, ast.Name) and _is_get_storage(v)}
    return names


def violations(source: str) -> list[str]:
    """Uses of storage beyond its interface, and imports of a backend, in one module's source."""
    tree, found = ast.parse(source), []
    names = _storage_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr not in INTERFACE and (
                _is_get_storage(node.value) or isinstance(node.value, ast.Name) and node.value.id in names):
            found.append(f"line {node.lineno}: .{node.attr} is not part of the storage interface")
        if isinstance(node, ast.ImportFrom) and node.module == "marketplace.artifacts.storage":
            found += [f"line {node.lineno}: imports {a.name}" for a in node.names if a.name not in IMPORTABLE]
        if isinstance(node, ast.Attribute) and node.attr == "IDLEGRID_ARTIFACT_DIR":
            found.append(f"line {node.lineno}: reads IDLEGRID_ARTIFACT_DIR (the filesystem backend's folder)")
    return found


def test_the_backends_offer_the_interface_and_nothing_more():
    assert INTERFACE == {"exists", "size", "save", "open", "local_path", "delete", "temp_files_purge"}
    for backend in (FileSystemStorage, S3ObjectStorage):
        assert {name for name in vars(backend) if not name.startswith("_")} == INTERFACE, backend.__name__


@pytest.mark.parametrize("source", [
    "get_storage().path(sha)",
    "storage = get_storage()\nstorage.path(sha).read_bytes()",
    "kind, storage = module, get_storage()\nstorage._file(sha)",
    "from marketplace.artifacts.storage import FileSystemStorage",
    "root = settings.IDLEGRID_ARTIFACT_DIR",
])
def test_the_check_catches_code_that_reaches_past_the_interface(source):
    assert len(violations(source)) == 1


def test_the_check_lets_the_interface_through():
    assert violations("storage = get_storage()\nwith storage.local_path(sha) as path:\n    storage.open(sha)") == []


def test_no_module_outside_artifacts_reaches_past_the_storage_interface():
    files = outside_artifacts()
    assert len(files) > 50  # the glob found the code
    found = {str(f.relative_to(ROOT)): v for f in files if f.name != "settings.py" and (v := violations(f.read_text()))}
    assert found == {}
