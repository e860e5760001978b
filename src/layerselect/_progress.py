"""Progress bars and quiet output: one helper for every long step.

:func:`progress` wraps ``tqdm`` so that every bar in the library behaves the same:

- bars go to **stderr**, so stdout holds only a command's result;
- on a terminal they are ordinary in-place tqdm bars;
- anywhere else (a log file, a pipe, a CI job) they print **plain lines**, one
  every :data:`PLAIN_INTERVAL` seconds at most plus the first and the last, with
  no carriage returns, so a log file stays readable.

:func:`quiet_libraries` turns off transformers' / datasets' / huggingface_hub's own
bars and info logs for a block; the CLI runs each command in it unless ``--verbose``
is given (never at import time of the library). :func:`format_log` formats Hugging Face ``Trainer`` logs as numbers
(``step 10/30  loss 1.2345  lr 1.00e-04``) for
:class:`layerselect.train.TrainerLogCallback`.

Example:
    >>> from layerselect._progress import progress
    >>> for x in progress(range(3), desc="work", disable=True):
    ...     pass
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any

from tqdm import tqdm

__all__ = [
    "PLAIN_INTERVAL",
    "progress",
    "is_tty",
    "quiet_libraries",
    "format_log",
    "format_value",
]

#: Seconds between two plain progress lines when the output is not a terminal.
PLAIN_INTERVAL = 30.0


def is_tty(stream: IO[str] | None) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes and test captures)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


class _PlainLines:
    """A file-like that turns tqdm's carriage-return refreshes into whole, distinct lines."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> int:
        for part in text.replace("\r", "\n").split("\n"):
            part = part.strip()
            if part and part != self.last:
                self.stream.write(part + "\n")
                self.last = part
        return len(text)

    def flush(self) -> None:
        getattr(self.stream, "flush", lambda: None)()


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str | None = None,
    total: float | None = None,
    unit: str = "it",
    disable: bool = False,
    file: IO[str] | None = None,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar on stderr (or ``file``): in place on a terminal, sparse plain lines elsewhere.

    Args:
        iterable: what to iterate over (or None and call ``update``).
        desc: the bar's label (e.g. ``"eval mgsm de"``).
        total: expected number of units (default: ``len(iterable)`` when it has one).
        unit: the unit shown in rates (``"it"``, ``"tok"``, ``"q"``, ``"B"``...).
        disable: no output at all.
        file: where to write (default: ``sys.stderr`` at call time).
        **kwargs: any other ``tqdm`` argument (``initial``, ``unit_scale``, ...).
    """
    stream = file if file is not None else sys.stderr
    if not disable and not is_tty(stream):
        kwargs.setdefault("mininterval", PLAIN_INTERVAL)
        # Every update checks the clock (no dynamic miniters) and tqdm's monitor thread,
        # which would refresh between updates, stays out: at most one line per interval.
        kwargs.setdefault("miniters", 1)
        kwargs.setdefault("maxinterval", math.inf)
        kwargs.setdefault("ncols", 100)
        kwargs.setdefault("ascii", True)
        stream = _PlainLines(stream)  # type: ignore[assignment]
    else:
        kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, file=stream, **kwargs)


@contextmanager
def quiet_libraries(quiet: bool = True) -> Iterator[None]:
    """Within the block, the bars and info logs of transformers, datasets and huggingface_hub are off.

    The CLI runs each command inside it unless ``--verbose`` is given; the library never
    changes these process-wide settings on import. Everything is restored on exit.
    ``quiet=False`` does nothing (so callers can pass their ``--verbose`` flag through).
    """
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    saved_env = {k: os.environ.get(k) for k in env}
    saved_hf = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    had_datasets = "datasets" in sys.modules  # otherwise the variables apply when it loads
    if had_datasets:
        import datasets

        saved_ds = (datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled())
    for k, v in env.items():
        os.environ.setdefault(k, v)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if had_datasets:
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        hf_logging.set_verbosity(saved_hf[0])
        if saved_hf[1]:
            hf_logging.enable_progress_bar()
        if had_datasets:
            datasets.logging.set_verbosity(saved_ds[0])
            if saved_ds[1]:
                datasets.enable_progress_bars()


# ---------------------------------------------------------------------------- Trainer logs


def format_value(key: str, value: Any) -> str:
    """One log value as a number with a fixed format per kind."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(x):
        return str(x)
    if key in ("learning_rate", "lr"):
        return f"{x:.2e}"
    if key == "epoch":
        return f"{x:.2f}"
    if key.endswith("runtime") or key.endswith("seconds"):
        return f"{x:.1f}s"
    if "per_second" in key:
        return f"{x:.2f}"
    if key in ("step", "total_flos") or (x.is_integer() and "loss" not in key):
        return f"{int(x):d}" if abs(x) < 1e15 else f"{x:.3e}"
    return f"{x:.4f}"


_SHORT = {"learning_rate": "lr", "eval_loss": "eval_loss", "grad_norm": "grad_norm"}


def format_log(logs: Mapping[str, Any], step: int | None = None, max_steps: int | None = None) -> str:
    """A Trainer log dict as one line of formatted numbers.

    Example:
        >>> format_log({"loss": 1.23456, "learning_rate": 1e-4, "epoch": 0.5}, step=10, max_steps=30)
        'step 10/30  loss 1.2346  lr 1.00e-04  epoch 0.50'
    """
    parts = []
    if step is not None:
        parts.append(f"step {step}/{max_steps}" if max_steps else f"step {step}")
    order = ["loss", "eval_loss", "learning_rate", "grad_norm", "epoch"]
    keys = [k for k in order if k in logs] + [k for k in logs if k not in order and k != "total_flos"]
    for key in keys:
        parts.append(f"{_SHORT.get(key, key)} {format_value(key, logs[key])}")
    return "  ".join(parts)
