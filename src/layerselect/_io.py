"""Small file-system helpers shared by every writer: atomic directory saves."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a scratch directory that replaces ``target`` only if the block succeeds.

    Files are written next to ``target`` (same file system, so the final rename
    is atomic). If the block raises, the scratch directory is removed and any
    previous ``target`` is left untouched. Files already in ``target`` that the
    block does not write are kept (a save adds to a directory, it does not wipe
    unrelated files such as a README the user put there).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield scratch
        umask = os.umask(0)
        os.umask(umask)
        for f in scratch.iterdir():
            _fsync(f)
            # Temp-file helpers create 0600 files; saved artefacts get normal permissions.
            os.chmod(f, 0o666 & ~umask)
        target.mkdir(parents=True, exist_ok=True)
        # Each os.replace is atomic; readers see either the old or the new file.
        for f in scratch.iterdir():
            os.replace(f, target / f.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "rb") as fh:
        os.fsync(fh.fileno())


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, parsed object)`` for each non-blank line of a JSON Lines file."""
    from .errors import InvalidInputError

    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path}:{i}: not valid JSON ({exc})") from None


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
