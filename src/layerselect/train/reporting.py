"""What training reports: log lines of numbers with a step bar, and the loss log files.

Example:
    >>> trainer.add_callback(TrainerLogCallback(bar=False))   # doctest: +SKIP
    >>> save_loss_log(trainer.state.log_history, "runs/slam")  # doctest: +SKIP
    (PosixPath('runs/slam/loss.json'), PosixPath('runs/slam/loss.png'))
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm
from transformers import TrainerCallback

from .._progress import format_log, format_value
from .._progress import progress as progress_bar

__all__ = ["StepTimeCallback", "TrainerLogCallback", "save_loss_log"]


class StepTimeCallback(TrainerCallback):
    """Wall and process-CPU seconds of each optimizer step (forward, backward, clipping, update).

    :func:`~layerselect.train.train_model` installs one and records its lists in
    ``train_summary.json`` (``step_seconds``, ``step_cpu_seconds``).
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._started: tuple[float, float] | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._started is not None:
            self.wall.append(time.perf_counter() - self._started[0])
            self.cpu.append(time.process_time() - self._started[1])
            self._started = None


class TrainerLogCallback(TrainerCallback):
    """Training as a :func:`~layerselect._progress.progress` bar over optimizer steps plus log lines of numbers.

    Replaces ``Trainer``'s ``ProgressCallback`` / ``PrinterCallback`` (dicts of strings on
    stdout, carriage-return streams in log files) with lines such as
    ``step 10/30  loss 1.2345  lr 1.00e-04  grad_norm 0.5312  epoch 0.33``, written to
    ``file`` (default: stderr) on the main process only. :func:`train_slam` installs it.

    Args:
        bar: show a step bar (the log lines are printed either way).
        file: where to write (default: ``sys.stderr`` at print time).
    """

    def __init__(self, bar: bool = True, file: IO[str] | None = None) -> None:
        self.bar_enabled = bar
        self.file = file
        self.bar: tqdm | None = None

    def _stream(self) -> IO[str]:
        return self.file if self.file is not None else sys.stderr

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.bar_enabled:
            self.bar = progress_bar(total=state.max_steps, desc="train", unit="step",
                                initial=state.global_step, file=self._stream())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if "train_runtime" in logs:  # the summary Trainer logs once at the end
            line = (f"trained {state.global_step} steps in {format_value('train_runtime', logs['train_runtime'])}"
                    f"  mean loss {format_value('train_loss', logs.get('train_loss', float('nan')))}")
        else:
            line = format_log(logs, state.global_step, state.max_steps)
        if self.bar is not None:
            self.bar.write(line, file=self._stream())
        else:
            print(line, file=self._stream(), flush=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def save_loss_log(log_history: Sequence[dict[str, Any]], out_dir: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """Write ``loss.json`` (step, loss, learning_rate, epoch) and ``loss.png`` (matplotlib, Agg)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        {k: e[k] for k in ("step", "loss", "learning_rate", "epoch", "grad_norm") if k in e}
        for e in log_history
        if "loss" in e
    ]
    evals = [{k: e[k] for k in ("step", "eval_loss", "epoch") if k in e} for e in log_history if "eval_loss" in e]
    json_path = out / "loss.json"
    json_path.write_text(json.dumps({"train": rows, "eval": evals}, indent=1) + "\n", encoding="utf-8")
    png_path: Path | None = out / "loss.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (target tokens)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png_path, dpi=100)
        plt.close(fig)
    except ImportError:
        png_path = None
    return json_path, png_path

