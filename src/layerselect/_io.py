"""File-system helpers shared by every writer and reader.

Writers never leave a mix of old and new files: a folder is built whole in a
scratch sibling and swapped in at the end (:func:`atomic_directory`), a single
file is written to a temporary sibling and renamed (:func:`atomic_write_text`).
Readers resolve names found *inside* files only as plain names inside the
file's own folder (:func:`contained_file`).

JSON goes through one set of helpers: :func:`jsonable` (values to what a JSON
round trip gives back), :func:`write_json` / :func:`read_json`, :func:`iter_jsonl`,
and :func:`check_format_version` for every reader of a versioned layerselect file
(statistics, selections, adapters).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from .errors import FormatError, InvalidInputError

__all__ = [
    "atomic_directory",
    "atomic_files",
    "atomic_write_text",
    "check_format_version",
    "check_output_path",
    "contained_file",
    "iter_jsonl",
    "iter_text_lines",
    "jsonable",
    "read_json",
    "read_text",
    "remove_dead_scratch",
    "write_json",
]

_BACKUP_TAG = ".old-"


def check_output_path(target: str | os.PathLike[str], marker: str | None, *, overwrite: bool = False,
                      what: str = "output") -> Path:
    """Refuse an output folder that cannot or should not be replaced, before any work is done.

    ``target`` may be missing or empty, or hold an earlier output of the same kind
    (recognised by its ``marker`` file); anything else is refused unless
    ``overwrite`` is set. A file where a folder should go, or a location that is
    not writable, is always refused.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise InvalidInputError(f"{what} {target} is an existing file, not a folder; choose a folder path")
    if target.is_dir() and not overwrite:
        entries = sorted(p.name for p in target.iterdir())
        if entries and (marker is None or not (target / marker).is_file()):
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise InvalidInputError(
                f"{what} {target} already holds files that are not a layerselect {what} ({shown}); "
                "choose a new or empty folder, or pass overwrite=True to replace it whole"
            )
    parent = _existing_ancestor(target.parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidInputError(f"cannot write {what} {target}: {parent} is not writable")
    return target


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike[str],
    marker: str | None = None,
    *,
    overwrite: bool = False,
    what: str = "output",
) -> Iterator[Path]:
    """Yield a scratch folder that replaces ``target`` *as a whole* if the block succeeds.

    The scratch folder is a sibling of ``target`` (same file system). At the end
    the two are swapped in one atomic ``renameat2(RENAME_EXCHANGE)`` where the OS
    has it (Linux), otherwise by two renames with the old folder kept aside until
    the new one is in place (and put back if that fails). If the block raises,
    the scratch folder is removed and ``target`` is untouched. The new folder holds
    exactly what the block wrote: stale files of an earlier output never survive.

    ``marker`` and ``overwrite``: see :func:`check_output_path` (checked first).
    """
    target = check_output_path(target, marker, overwrite=overwrite, what=what)
    _restore_interrupted_swap(target)
    remove_dead_scratch(target)
    scratch = _scratch_beside(target, what, create_target=False)
    try:
        yield scratch
        _finalise(scratch)
        _swap_in(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(target: str | os.PathLike[str], remove: tuple[str, ...] | list[str] = ()) -> Iterator[Path]:
    """Yield a scratch folder whose files are moved into the existing folder ``target``, one rename each.

    For folders that other writers share (a Trainer checkpoint): each file is
    replaced atomically, other files are kept. Names in ``remove`` that the block
    did not write are deleted afterwards (files of an earlier save that no longer apply).
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise InvalidInputError(f"{target} is an existing file, not a folder; choose a folder path")
    remove_dead_scratch(target)
    scratch = _scratch_beside(target, "output", create_target=True)
    try:
        yield scratch
        _finalise(scratch)
        written = {f.name for f in scratch.iterdir()}
        for f in scratch.iterdir():
            os.replace(f, target / f.name)
        for name in remove:
            if name not in written:
                (target / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _host() -> str:
    """This machine's name as it appears in scratch folder names (file-name safe, no ``-``)."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "localhost"


def _scratch_prefix(target: Path) -> str:
    """``.NAME.tmp-PID@HOST-``: who writes the scratch folder, so a later save can tell if it died."""
    return f".{target.name}.tmp-{os.getpid()}@{_host()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists but is someone else's (or not a pid we can ask about): keep its folder
    return True


def remove_dead_scratch(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the scratch folders of earlier saves of ``target`` whose writer process is dead.

    A save killed hard (SIGKILL, power loss) cannot clean up after itself, so its
    ``.NAME.tmp-PID@HOST-XXXX`` folder stays next to ``target``. Only folders
    written on this host by a process that no longer exists are removed; a live
    writer's folder, one from another host (a shared file system) and one whose
    name records no writer (written before the writer was recorded) are left alone.
    Returns what was removed.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{target.name}.tmp-") + r"(\d+)@([A-Za-z0-9._]+)-[^-]*\Z")
    host, removed = _host(), []
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            found = pattern.match(entry.name)
            if found is None or found.group(2) != host or not entry.is_dir() or entry.is_symlink():
                continue
            if _pid_alive(int(found.group(1))):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
    return removed


def _scratch_beside(target: Path, what: str, *, create_target: bool) -> Path:
    """A new empty folder next to ``target`` (same file system, so renames are atomic).

    Its name records the writer (:func:`_scratch_prefix`) for :func:`remove_dead_scratch`.
    """
    try:
        (target if create_target else target.parent).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=_scratch_prefix(target), dir=target.parent))
    except OSError as exc:
        raise InvalidInputError(f"cannot write {what} {target}: {exc.strerror or exc}") from None


def _finalise(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    # mkdtemp and temp-file helpers create 0700/0600 entries; outputs get normal permissions.
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(Path(root) / d, 0o777 & ~umask)
        for f in files:
            p = Path(root) / f
            _fsync(p)
            os.chmod(p, 0o666 & ~umask)
    _fsync_dir(folder)


def _swap_in(scratch: Path, target: Path) -> None:
    if not target.exists():
        os.rename(scratch, target)
        _fsync_dir(target.parent)
        return
    if _exchange(scratch, target):
        # ``scratch`` now holds the old folder; the caller's cleanup removes it.
        _fsync_dir(target.parent)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}{_BACKUP_TAG}", dir=target.parent))
    os.rmdir(backup)
    os.rename(target, backup)
    try:
        os.rename(scratch, target)
    except BaseException:
        os.rename(backup, target)
        raise
    _fsync_dir(target.parent)
    shutil.rmtree(backup, ignore_errors=True)


def _restore_interrupted_swap(target: Path) -> None:
    """Put back an old folder left aside by a two-rename swap that was interrupted."""
    if target.exists() or not target.parent.is_dir():
        return
    backups = sorted(target.parent.glob(f".{target.name}{_BACKUP_TAG}*"), key=lambda p: p.stat().st_mtime)
    if backups:
        os.rename(backups[-1], target)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where unavailable."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        with contextlib.suppress(OSError, AttributeError, TypeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
    if not _renameat2:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0  # EINVAL/ENOSYS (file system or kernel without it): fall back to two renames


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and one rename."""
    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"{path} is a folder; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as exc:
        raise InvalidInputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def contained_file(directory: str | os.PathLike[str], name: Any, what: str = "a file name") -> Path:
    """``directory / name`` for a plain file name found inside a file; anything else is a FormatError.

    Names that are absolute, contain a path separator or ``..``, or are not strings
    are refused before any file is opened: a file must not make us read or write
    outside its own folder.
    """
    if (
        not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
        or "\x00" in name or os.path.isabs(name) or Path(name).name != name
    ):
        raise FormatError(
            f"{what} {name!r} in {directory} is not a plain file name inside that folder; "
            "refusing to follow it (the file may be corrupt or hostile)"
        )
    return Path(directory) / name


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, parsed object)`` for each non-blank line of a JSON Lines file."""
    for i, line in iter_text_lines(path):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{path}:{i}: not valid JSON ({exc})") from None


def iter_text_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, line without its newline)`` of a UTF-8 text file.

    A line that is not UTF-8 raises :class:`InvalidInputError` naming the file and line.
    """
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInputError(
                    f"{path}:{i}: not UTF-8 text (byte {exc.start} of the line: {exc.reason}); "
                    "save the file as UTF-8"
                ) from None
            if i == 1:
                line = line.removeprefix("\ufeff")
            yield i, line.rstrip("\r\n")


def read_text(path: str | os.PathLike[str]) -> str:
    """The whole of a UTF-8 text file; not UTF-8 raises :class:`InvalidInputError` naming the line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidInputError(
            f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8"
        ) from None


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike[str], what: str = "the file") -> Any:
    """Parse a UTF-8 JSON file; invalid JSON or text raises :class:`FormatError` naming the file.

    Example:
        >>> read_json("stats/stats.json", "the statistics")     # doctest: +SKIP
        {'format_version': 2, ...}
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path} is not valid JSON ({exc}); {what} is corrupt") from None


def jsonable(obj: Any, *, nonfinite: Literal["keep", "str"] = "keep") -> Any:
    """``obj`` as what a JSON round trip gives back: plain dicts (string keys), lists, scalars.

    Tensors, numpy arrays and numpy scalars become lists / Python numbers (their
    ``tolist()``), tuples become lists, functions their ``__name__``, anything
    else its ``repr``. Non-finite floats stay floats with ``nonfinite="keep"``
    (Python's ``json`` writes and reads them as ``NaN`` / ``Infinity``; used for
    selection files, whose values stay numbers in memory) or become the strings
    ``"nan"``, ``"inf"``, ``"-inf"`` with ``nonfinite="str"`` (strict JSON, for
    files that other tools parse, such as the adapter config).

    Example:
        >>> import torch
        >>> jsonable({1: (torch.tensor([0.5]), float("nan"))}, nonfinite="str")
        {'1': [[0.5], 'nan']}
    """
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, nonfinite=nonfinite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, nonfinite=nonfinite) for v in obj]
    if not isinstance(obj, (str, bytes)) and callable(getattr(obj, "tolist", None)):
        return jsonable(obj.tolist(), nonfinite=nonfinite)  # torch / numpy values
    if isinstance(obj, float) and nonfinite == "str" and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if callable(obj):
        return getattr(obj, "__name__", repr(obj))
    return repr(obj)


def check_format_version(
    found: Any,
    supported: int,
    what: str,
    *,
    where: str | os.PathLike[str] | None = None,
    written_by: str | None = None,
) -> int:
    """The ``format_version`` read from a file, checked: a positive integer up to ``supported``.

    ``what`` names the format ("stats", "selection", "adapter"), ``where`` the file
    or folder (for the message) and ``written_by`` the library version recorded in
    it. A missing or non-integer version, or one newer than this library reads,
    raises :class:`FormatError`.

    Example:
        >>> check_format_version(2, 2, "stats")
        2
        >>> check_format_version(3, 2, "stats", where="runs/stats")   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        layerselect.errors.FormatError: runs/stats uses stats format version 3, newer than ...
    """
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        place = f"{where}" if where is not None else f"the {what} file"
        raise FormatError(
            f"{place} has no integer format_version (found {found!r}); it was not written by layerselect"
        )
    if found > supported:
        head = f"{where} uses {what} format version {found}" if where is not None else (
            f"{what} format version {found}"
        )
        if written_by:
            head += f" (written by layerselect {written_by})"
        raise FormatError(
            f"{head}, newer than this layerselect reads (versions up to {supported}). "
            "Upgrade layerselect to read it (pip install --upgrade layerselect)."
        )
    return found
