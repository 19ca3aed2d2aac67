"""Offline English text: sentences of the docstrings in Python's own standard library.

The source files are parsed (``ast``), never imported, so no module runs. The sentence set
depends on the Python version (docstrings change between releases); it is fixed for one.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

# Pure-Python stdlib modules with plenty of prose docstrings on varied topics.
SOURCE_MODULES = (
    "argparse", "ast", "asyncio/base_events", "asyncio/locks", "asyncio/queues", "bisect",
    "calendar", "collections/__init__", "configparser", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email/message", "enum", "fractions", "ftplib",
    "functools", "gettext", "glob", "gzip", "heapq", "hmac", "http/client", "http/cookies",
    "http/server", "imaplib", "inspect", "ipaddress", "json/decoder", "json/encoder",
    "locale", "logging/__init__", "logging/handlers", "mailbox", "mimetypes", "ntpath",
    "optparse", "os", "pathlib", "pdb", "pickle", "platform", "posixpath", "pprint",
    "random", "shutil", "smtplib", "socket", "socketserver", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "turtle", "typing", "unittest/case", "urllib/parse", "urllib/request",
    "uuid", "warnings", "wave", "weakref", "zipfile",
)
MIN_WORDS, MAX_WORDS = 6, 30  # whole sentences that fit a short token budget
_SENTENCE_END = re.compile(r"(?<=[a-z)][.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-/]+[.!?]$")


@lru_cache(maxsize=1)
def stdlib_sentences() -> tuple[str, ...]:
    """Distinct prose sentences of the stdlib docstrings, sorted (so order is stable)."""
    sentences: set[str] = set()
    for path in _source_files():
        for docstring in _docstrings(path.read_text(encoding="utf-8")):
            sentences.update(s for s in _split_sentences(docstring) if _is_prose(s))
    if not sentences:
        raise RuntimeError(f"no docstring sentences found under {_stdlib_dir()}: "
                           "the examples need Python's standard library sources (.py files)")
    return tuple(sorted(sentences))


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files() -> list[Path]:
    root = _stdlib_dir()
    return [p for p in (root / f"{name}.py" for name in SOURCE_MODULES) if p.is_file()]


def _docstrings(source: str) -> list[str]:
    tree = ast.parse(source)
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(
        n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return [d for d in (ast.get_docstring(n) for n in nodes) if d]


def _split_sentences(docstring: str) -> list[str]:
    paragraphs = re.split(r"\n\s*\n", docstring)
    text = [" ".join(p.split()) for p in paragraphs]
    return [s for p in text for s in _SENTENCE_END.split(p)]


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    return MIN_WORDS <= len(words) <= MAX_WORDS and bool(_PROSE.match(sentence))
