"""Content hashes shared by the stages (weights identity, cache fingerprints and file checksums)."""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

CHUNK = 16 << 20


def file_checksum(path: str | Path) -> str:
    """BLAKE2b-128 of a file's bytes, read in chunks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def mapping_key(parts: Mapping, length: int = 8) -> str:
    """A short stable hash of a JSON-able mapping (key order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=length).hexdigest()


def source_fingerprint(package_dir: str | Path | None = None, length: int = 8) -> str:
    """A short hash of this package's Python code: results made by other code get another key. Docstrings, comments
    and layout are not code (a docstring edit keeps finished comparisons); any change to what runs is."""
    root = Path(package_dir) if package_dir else Path(__file__).resolve().parent
    h = hashlib.blake2b(digest_size=length)
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(code_of(path.read_text()).encode())
    return h.hexdigest()


def code_of(source: str) -> str:
    """``source``'s syntax tree without docstrings, as text (comments and line numbers never reach it)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)
