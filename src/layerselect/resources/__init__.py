"""Data shipped inside the package: MGSM, its English solutions, the demo prompts, the retention set.

The files keep their own licences (MGSM: CC BY 4.0; the solutions, from the
GSM8K test set, and the retention guard's 200 GSM8K-train problems: MIT); see
``resources/data/NOTICE.md``. Use them by name:
``load_texts("mgsm")``, ``--data mgsm`` on the command line, or the helpers here.

Example:
    >>> from layerselect.resources import mgsm_dir, mgsm_solutions, MGSM_LANGS
    >>> (mgsm_dir() / "mgsm_de.tsv").is_file(), len(MGSM_LANGS)
    (True, 11)
    >>> sols = mgsm_solutions(limit=2)
    >>> sols[0]["answer"], sols[0]["solution"].endswith("#### 18")
    ('18', True)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "MGSM_LANGS",
    "NAMED_SOURCES",
    "data_dir",
    "demo_prompts_path",
    "gsm8k_retain_path",
    "mgsm_dir",
    "mgsm_solutions",
    "mgsm_solutions_path",
    "named_source",
]

_HERE = Path(__file__).resolve().parent

#: Languages of the bundled MGSM (line i is the same question in each).
MGSM_LANGS = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")


def data_dir() -> Path:
    """The folder of bundled data sets (``mgsm/``, ``mgsm_solutions/``, ``NOTICE.md``)."""
    return _HERE / "data"


def mgsm_dir() -> Path:
    """The bundled MGSM folder: ``mgsm_{lang}.tsv`` for the 11 languages (CC BY 4.0)."""
    return data_dir() / "mgsm"


def mgsm_solutions_path() -> Path:
    """The bundled ``mgsm_en_solutions.jsonl`` (GSM8K test solutions, MIT)."""
    return data_dir() / "mgsm_solutions" / "mgsm_en_solutions.jsonl"


def gsm8k_retain_path() -> Path:
    """The retention guard's default set: the last 200 GSM8K-train problems with solutions (MIT).

    ``{"index", "question", "solution", "answer"}`` per line, index 7273-7472; see
    ``data/gsm8k_retain/README.md`` for how the file was made.
    """
    return data_dir() / "gsm8k_retain" / "gsm8k_train_last200.jsonl"


def demo_prompts_path() -> Path:
    """The 20 parallel questions the demo uses (8 languages, written for this project)."""
    return _HERE / "demo_prompts.jsonl"


def mgsm_solutions(limit: int | None = None) -> list[dict[str, Any]]:
    """The English solutions of the MGSM questions, in MGSM order.

    Each record is ``{"index", "question", "solution", "answer"}``; record i
    belongs to line i of every ``mgsm_{lang}.tsv``. ``solution`` ends with
    ``#### answer``. ``limit`` keeps the first N.
    """
    out = []
    with open(mgsm_solutions_path(), encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(out) >= limit:
                break
            if line.strip():
                out.append(json.loads(line))
    return out


#: Named data sources: ``name -> (kind, path function)`` for ``load_texts`` / ``--data``.
NAMED_SOURCES = {
    "mgsm": ("mgsm", mgsm_dir),
    "demo": ("demo", demo_prompts_path),
}


def named_source(name: str) -> tuple[str, Path] | None:
    """``(kind, path)`` of a bundled source called ``name``, or None if there is none."""
    entry = NAMED_SOURCES.get(name)
    return None if entry is None else (entry[0], entry[1]())
