"""The generations files of :func:`~layerselect.eval.evaluate`: one JSON Lines file per language.

``out_dir/{task}_{lang}.jsonl`` holds one record per question (``id``, ``lang``,
``question``, ``gold``, ``response``, ``prediction``, ``correct``). Records are
appended while generating, so a crash can leave a truncated last line:
:func:`read_records` drops it (and repairs the file); any other bad line is an
error. :func:`rewrite_records` replaces a file atomically.

Example:
    >>> from layerselect.eval.records import read_records, records_path
    >>> read_records(records_path("no-such-folder", "mgsm", "de"))
    []
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from ..errors import FormatError
from .tasks import Task, get_task

__all__ = ["records_path", "read_records", "rewrite_records"]


def records_path(out_dir: str | os.PathLike[str], task: str | Task, lang: str) -> Path:
    """Where the generations of ``lang`` live: ``out_dir/{task}_{lang}.jsonl``."""
    return Path(out_dir) / f"{get_task(task).name}_{lang}.jsonl"


def read_records(path: str | os.PathLike[str], repair: bool = True) -> list[dict[str, Any]]:
    """The records of a generations file; ``[]`` when it does not exist.

    A last line that is unterminated or not valid JSON (a crash mid-write) is
    dropped, and with ``repair=True`` the file is truncated to its last good
    line. Any other bad line raises :class:`~layerselect.errors.FormatError`.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    good_end = 0
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl == -1 else nl + 1
        line = data[pos:end]
        is_last = end >= len(data)
        try:
            rec = json.loads(line.decode("utf-8")) if line.strip() else None
            if rec is not None and not (isinstance(rec, dict) and "id" in rec):
                raise ValueError("not a record")
            if nl == -1 and rec is not None:
                raise ValueError("unterminated")
        except (ValueError, UnicodeDecodeError):
            if is_last:
                break
            lineno = data[:pos].count(b"\n") + 1
            raise FormatError(
                f"{path}: line {lineno} is not a JSON record; "
                "fix or delete the file (or pass overwrite=True)"
            ) from None
        if rec is not None:
            records.append(rec)
        good_end = end
        pos = end
    if repair and good_end < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
        print(f"[eval] {path.name}: dropped a truncated last line", file=sys.stderr)
    return records


def rewrite_records(path: str | os.PathLike[str], records: Sequence[dict[str, Any]]) -> None:
    """Replace the generations file ``path`` with ``records``, atomically."""
    atomic_write_text(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))
