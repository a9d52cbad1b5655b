"""Text for the transformer benchmarks: the Python standard library's own sources.

Every machine with Python has them, so the benchmark needs no download. The files are the ``*.py``
files under ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` excluded) in sorted order of
their relative path; the file of sorted index ``i`` is held out for evaluation when
``i % HOLDOUT_EVERY == 0``, otherwise it is training text. Calibration data for the peers is always
drawn from the training files, evaluation data always from the held-out files.

The figures depend on the Python version that supplies the files (3.11 here); the version is
recorded with every result.

* :func:`corpus_bytes`: the training or held-out text as one ``uint8`` array, cut to a byte budget.
* :func:`docstring_pairs`: ``(docstring first line, "def name(args)")`` pairs of documented
  functions, the positives of the sentence-encoder's contrastive training.
* :func:`eval_sentences` / :func:`calibration_sentences`: fixed, seeded lists of docstring first
  lines for measuring and calibrating embedding models.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

HOLDOUT_EVERY = 20
TRAIN_BYTES = 8_000_000
EVAL_BYTES = 262_144


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def stdlib_files(split: str) -> list[Path]:
    """The sorted ``*.py`` files of one split: ``"train"`` or ``"eval"`` (every 20th file)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    root = stdlib_root()
    files = sorted((p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts),
                   key=lambda p: p.relative_to(root).as_posix())
    held_out = split == "eval"
    return [p for i, p in enumerate(files) if (i % HOLDOUT_EVERY == 0) == held_out]


def corpus_bytes(split: str, budget: int | None = None) -> np.ndarray:
    """The split's files concatenated in order (newline-separated), cut to ``budget`` bytes.

    Returns:
        ``(n,)`` uint8 array, ``n <= budget`` (default: TRAIN_BYTES or EVAL_BYTES).
    """
    budget = budget or (TRAIN_BYTES if split == "train" else EVAL_BYTES)
    parts, size = [], 0
    for path in stdlib_files(split):
        data = path.read_bytes() + b"\n"
        parts.append(data[: budget - size])
        size += len(parts[-1])
        if size >= budget:
            break
    return np.frombuffer(b"".join(parts), dtype=np.uint8).copy()


def _documented_defs(path: Path) -> Iterator[ast.AST]:
    """Function, class and module nodes of one file that carry a docstring; unparsable files yield none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old test files
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # the stdlib ships a few deliberately broken test files
            return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            if doc and doc.strip():
                yield node


def _first_line(node: ast.AST) -> str:
    return ast.get_docstring(node).strip().splitlines()[0].strip()


def docstring_pairs(split: str, every: int = 1, max_len: int = 96) -> list[tuple[str, str]]:
    """``(first docstring line, "def name(args)")`` of every documented function of the split.

    Args:
        split: ``"train"`` or ``"eval"``.
        every: parse only every ``every``-th file of the split (a cheaper, still deterministic subset).
        max_len: both strings are cut to this many characters.
    """
    pairs = []
    for path in stdlib_files(split)[::every]:
        for node in _documented_defs(path):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                line = _first_line(node)
                if len(line) >= 12:
                    pairs.append((line[:max_len], f"def {node.name}({ast.unparse(node.args)})"[:max_len]))
    return pairs


def _docstring_lines(files: list[Path]) -> list[str]:
    lines = {_first_line(node) for path in files for node in _documented_defs(path)}
    return sorted(s for s in lines if 20 <= len(s) <= 200)


def eval_sentences(n: int = 500, seed: int = 0) -> list[str]:
    """A seeded sample of ``n`` distinct docstring first lines (20-200 characters) of held-out files, sorted."""
    lines = _docstring_lines(stdlib_files("eval"))
    if n >= len(lines):
        return lines
    pick = np.random.default_rng(seed).choice(len(lines), size=n, replace=False)
    return sorted(lines[i] for i in pick)


def calibration_sentences(n: int = 128, seed: int = 0) -> list[str]:
    """``n`` docstring first lines of training files (every 10th training file), seeded, sorted."""
    lines = _docstring_lines(stdlib_files("train")[::10])
    pick = np.random.default_rng(seed).choice(len(lines), size=min(n, len(lines)), replace=False)
    return sorted(lines[i] for i in pick)
