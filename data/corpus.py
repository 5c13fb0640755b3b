"""The embedded default corpus, built from text that every Python installation carries, so a
smoke run needs no download and no third-party text lives in this repository.

- "general": the language reference topics of `pydoc_data` and the longer docstrings of the
  standard library (prose about programming, in English).
- "code": the standard library's own Python source.

Test suites, GUI tools and vendored packages are left out. Documents come in a fixed order, so
the corpus, the tokenizer trained on it and the shards prepared from it are reproducible for a
given Python version.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
from dataclasses import dataclass
from pathlib import Path

PARTS = ("general", "code")
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "tkinter",
             "turtledemo", "ensurepip", "__pycache__", "venv"}
MIN_DOCSTRING = 200  # characters; shorter docstrings are one-liners that teach little


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    # a repository (glm-data prepare --repo-level): its text files as (relative path, text), in
    # order; `text` is then their concatenation, for counting and emptiness
    files: tuple[tuple[str, str], ...] = ()


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files() -> list[Path]:
    root = stdlib_dir()
    return sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))


@functools.lru_cache(maxsize=None)
def _documents(part: str) -> tuple[Document, ...]:
    root = stdlib_dir()
    if part == "code":
        return tuple(Document(f"stdlib/{p.relative_to(root)}", p.read_text(encoding="utf-8", errors="replace"))
                     for p in source_files())
    if part != "general":
        raise ValueError(f"embedded corpus has parts {PARTS}, not {part!r}")
    from pydoc_data import topics

    docs = [Document(f"pydoc_data/{name}", text) for name, text in sorted(topics.topics.items())]
    for path in source_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) >= MIN_DOCSTRING:
                    docs.append(Document(f"stdlib/{path.relative_to(root)}:{getattr(node, 'lineno', 1)}", text))
    return tuple(docs)


def documents(part: str) -> tuple[Document, ...]:
    return _documents(part)
