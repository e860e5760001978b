"""Helpers for the hostile-input tests: file snapshots and injected failures."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from layerselect import _io


def snapshot(root: Path, exclude: Path | None = None) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (except under ``exclude``)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if exclude is not None and (path == exclude or exclude in path.parents):
            continue
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_error(exc_info: pytest.ExceptionInfo, *words: str) -> None:
    message = str(exc_info.value).lower()
    for word in words:
        assert word.lower() in message, f"{word!r} not in {message!r}"


class Injected(RuntimeError):
    """The failure injected by :func:`fail_at`."""


@contextmanager
def fail_at(step: int) -> Iterator[list[str]]:
    """Make the ``step``-th file-system write/rename step of a save raise :class:`Injected`.

    Counts calls to ``os.replace``, ``os.rename``, the atomic folder exchange,
    ``safetensors`` ``save_file`` and JSON writes made through layerselect's helpers;
    yields the list of steps seen (to learn how many there are).
    """
    import safetensors.torch as st

    seen: list[str] = []
    originals: dict[tuple[object, str], Callable] = {}

    def wrap(owner: object, name: str) -> None:
        original = getattr(owner, name)
        originals[(owner, name)] = original

        def wrapper(*args, **kwargs):
            seen.append(name)
            if len(seen) == step:
                raise Injected(f"injected failure at step {step} ({name})")
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    wrap(os, "replace")
    wrap(os, "rename")
    wrap(_io, "_exchange")
    wrap(_io, "atomic_write_text")
    wrap(st, "save_file")
    from layerselect.selective_ffn import adapter_file
    from layerselect.stats import files as stats

    for module in (stats, adapter_file):
        if hasattr(module, "save_file"):
            wrap(module, "save_file")
    try:
        yield seen
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


def count_steps(action: Callable[[], object]) -> int:
    with fail_at(10**9) as seen:
        action()
    return len(seen)
