"""The adapter's model card: ``README.md`` with Hugging Face Hub metadata, built from facts.

Every adapter folder gets a ``README.md`` (as every PEFT adapter on the Hub does): YAML
front matter (``library_name: layerselect``, ``base_model``, tags ``layerselect``,
``slam``, ``selective-ffn``) and a body saying which layers and matrices were trained,
how the layers were chosen, the trainable share, the training data and the measured
losses when known, and how to load the adapter.

Everything here is pure (facts in, text out) except :func:`update_model_card`,
:func:`user_card` and :func:`warn_kept`, which read the folder or warn, and
:func:`public_model_name`, which asks whether a name exists on disk. The card is ours only while it is exactly
what we wrote: its marker comment (:data:`MARKER`) carries a hash of the rest, so a
card the user edited, or a README.md of their own, is never overwritten (it is kept,
and a warning says so once per folder). Adapter readers ignore ``README.md`` and the
checksums in ``layerselect_adapter.json`` do not cover it.

No machine path is written: a base recorded as a local folder or file is left out of
``base_model`` (a Hub id or a bundled name such as ``gemma-3-270m`` is kept), and
absolute paths inside other facts are cut to their last component (``pairs:…/de-en``).

Example:
    >>> facts = {"layers": [0, 1], "target_modules": ["up", "down"], "base_model": "org/base",
    ...          "target_matrices": ["mlp.up_proj", "mlp.down_proj"]}
    >>> text = render_card(facts)
    >>> text.splitlines()[:3]
    ['---', 'library_name: layerselect', 'base_model: "org/base"']
    >>> is_unedited_card(text), card_facts_of(text)["layers"]
    (True, [0, 1])
    >>> is_unedited_card(text.replace("## How to use it", "## Usage"))
    False
    >>> public_model_name("/home/me/models/llama"), public_model_name("meta-llama/Llama-2-7b-hf")
    (None, 'meta-llama/Llama-2-7b-hf')
    >>> public_text("pairs:/home/me/data/gsm8k")
    'pairs:…/gsm8k'
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CARD_NAME",
    "MARKER",
    "TAGS",
    "adapter_facts",
    "card_facts_of",
    "facts_from_adapter_meta",
    "is_unedited_card",
    "public_model_name",
    "public_text",
    "reconstruction_facts",
    "render_card",
    "update_model_card",
    "user_card",
    "warn_kept",
]

CARD_NAME = "README.md"
#: Start of the marker comment that identifies a card layerselect wrote (followed by a hash).
MARKER = "<!-- layerselect:model-card"
TAGS = ("layerselect", "slam", "selective-ffn")
_FACTS_TAG = "<!-- layerselect:card-facts "
_MARKER_LINE = re.compile(r"^<!-- layerselect:model-card sha256:([0-9a-f]{16}) -->\n", re.M)
_FACTS_LINE = re.compile(r"^<!-- layerselect:card-facts (\{.*\}) -->$", re.M)
#: A Hub model id (``name`` or ``org/name``); Hub ids never hold ``--`` or ``..``.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# An absolute path at the start of a string or after a separator (``pairs:/data/x``, ``dir=/x``);
# ``//`` (URLs) is left alone.
_ABS_PATH = re.compile(r"(?:^|(?<=[\s:=(\[,'\"`]))(?:~|[A-Za-z]:)?[/\\](?![/\\])[^\s'\"`,)\]]*")
_HEAD_BYTES = 1 << 20  # a README larger than this is not a card of ours

#: Training facts the card knows how to show, in order, with their labels.
TRAINING_FACTS: tuple[tuple[str, str], ...] = (
    ("train_data", "training data"),
    ("train_pairs", "training pairs"),
    ("languages", "source languages"),
    ("steps", "optimizer steps"),
    ("epochs", "epochs"),
    ("effective_batch_size", "effective batch size"),
    ("learning_rate", "learning rate"),
    ("precision", "precision"),
    ("train_loss", "mean training loss"),
    ("final_train_loss", "final training loss (last logged)"),
    ("heldout_pairs", "held-out pairs"),
    ("heldout_loss_before", "held-out translation loss before"),
    ("heldout_loss_after", "held-out translation loss after"),
    ("translation_loss", "translation loss"),
    ("reasoning_gap", "reasoning gap (NLL to English, nats/token)"),
)
# Facts about the adapter itself (not shown under "Other facts").
_ADAPTER_KEYS = frozenset({
    "base_model", "base_withheld", "model_type", "family", "num_layers", "layers", "target_modules",
    "target_matrices", "partial_fused", "trainable_parameters", "total_parameters", "delta_dtype",
    "delta_dtypes", "exact", "selection", "adapter_name", "library_version",
})
_warned: set[str] = set()


# ----------------------------------------------------------------------------------------
# No machine paths
# ----------------------------------------------------------------------------------------
def public_model_name(name: Any) -> str | None:
    """``name`` if it is a Hub id or bundled name, None for a local path (never written to a card).

    A name is withheld when it is absolute, starts with ``.`` or ``~``, has more than one
    ``/``, a backslash or a drive letter, names a ``.gguf`` file, or exists on this machine.
    """
    if not isinstance(name, str) or not _HUB_ID.match(name) or "--" in name or ".." in name:
        return None
    if name.lower().endswith(".gguf") or os.path.exists(os.path.expanduser(name)):
        return None
    return name


def public_text(value: Any) -> Any:
    """``value`` with every absolute path in its strings cut to ``…/<last component>`` (recursively)."""
    if isinstance(value, str):
        return _ABS_PATH.sub(lambda m: "…/" + (re.split(r"[/\\]", m.group(0).rstrip("/\\"))[-1]), value)
    if isinstance(value, Mapping):
        return {str(k): public_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_text(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------
# Facts
# ----------------------------------------------------------------------------------------
_MATRIX = re.compile(r"^.*\.\d+\.(?P<module>[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*)\.weight$")


def _matrices(target_names: Iterable[str]) -> list[str]:
    """``model.layers.3.mlp.up_proj.weight`` -> ``mlp.up_proj`` (each once, in order)."""
    out: list[str] = []
    for name in target_names:
        m = _MATRIX.match(name)
        short = m["module"] if m else name
        if short not in out:
            out.append(short)
    return out


def adapter_facts(
    config: Any,
    base_info: Mapping[str, Any],
    target_names: Iterable[str] = (),
    *,
    trainable: int | None = None,
    total: int | None = None,
    partial_fused: Mapping[str, Iterable[str]] | None = None,
    adapter_name: str | None = None,
) -> dict[str, Any]:
    """The facts of an adapter as saved: base, layers, matrices, trainable counts, selection provenance.

    ``config`` is a :class:`~layerselect.selective_ffn.SelectiveFFNConfig`; ``base_info`` what
    ``layerselect_adapter.json`` records under ``"base_model"``; ``partial_fused`` maps a fused
    matrix (``mlp.gate_up_proj``) to the roles trained inside it when only some are.
    """
    from .._version import __version__

    recorded = base_info.get("name_or_path") or getattr(config, "base_model_name_or_path", None)
    public = public_model_name(recorded)
    facts: dict[str, Any] = {
        "base_model": public,
        "base_withheld": bool(recorded) and public is None,
        "model_type": base_info.get("model_type"),
        "family": base_info.get("family"),
        "num_layers": base_info.get("num_layers"),
        "layers": list(config.layers),
        "target_modules": list(config.target_modules),
        "target_matrices": _matrices(target_names),
        "delta_dtype": getattr(config, "delta_dtype", None),
        "library_version": __version__,
    }
    if partial_fused:
        facts["partial_fused"] = {k: list(v) for k, v in partial_fused.items()}
    if trainable is not None:
        facts["trainable_parameters"] = int(trainable)
    if total is not None:
        facts["total_parameters"] = int(total)
    if adapter_name:
        facts["adapter_name"] = adapter_name
    selection = getattr(config, "selection", None)
    if isinstance(selection, Mapping):
        keep = ("type", "criterion", "name", "params", "threshold", "scores", "reason", "why",
                "explanation", "notes", "details")
        facts["selection"] = public_text({k: selection[k] for k in keep if k in selection})
    return _jsonable(facts)


def facts_from_adapter_meta(meta: Mapping[str, Any], adapter_name: str | None = None) -> dict[str, Any]:
    """:func:`adapter_facts` from a ``layerselect_adapter.json`` (no trainable counts: it holds none)."""
    from .config import SelectiveFFNConfig

    config = SelectiveFFNConfig.from_dict(meta["config"])
    base = meta.get("base_model") if isinstance(meta.get("base_model"), Mapping) else {}
    facts = adapter_facts(config, base, sorted(meta.get("tensors") or {}, key=_role_order), adapter_name=adapter_name)
    facts.update(reconstruction_facts(meta))
    return facts


def _role_order(name: str) -> tuple[int, int, str]:
    """Sort key of a tensor name: layer, then the canonical role order (gate, up, down, q, k, v, o)."""
    from ..arch import TARGET_ROLES, normalize_target_modules

    parts = name.removesuffix(".weight").split(".")
    layer = next((int(p) for p in reversed(parts) if p.isdigit()), -1)
    try:
        role = min(TARGET_ROLES.index(r) for r in normalize_target_modules(parts[-1]))
    except Exception:
        role = len(TARGET_ROLES)
    return layer, role, name


def reconstruction_facts(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``delta_dtypes`` and ``exact`` from a ``layerselect_adapter.json``'s tensors and reconstruction."""
    tensors = meta.get("tensors") if isinstance(meta.get("tensors"), Mapping) else {}
    dtypes = sorted({str(t.get("delta_dtype")) for t in tensors.values() if isinstance(t, Mapping)})
    rec = meta.get("reconstruction") if isinstance(meta.get("reconstruction"), Mapping) else {}
    out: dict[str, Any] = {"delta_dtypes": dtypes}
    if isinstance(rec.get("exact"), bool):
        out["exact"] = rec["exact"]
    return out


def _jsonable(value: Any) -> Any:
    """Strict JSON values (non-finite floats as strings), so the facts survive the card's comment."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return _jsonable(value.item())
    return str(value)


# ----------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e6 else f"{value:.4g}"
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return _text(value).replace("|", "\\|").replace("\n", " ")


def _text(value: Any) -> str:
    """Free text from the facts, inert in markdown: no HTML (hence no comment that looks like our marker)."""
    return str(value).replace("<", "&lt;")


def _yaml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def _front_matter(facts: Mapping[str, Any]) -> list[str]:
    lines = ["---", "library_name: layerselect"]
    if facts.get("base_model"):
        lines += [f"base_model: {_yaml_str(facts['base_model'])}", "base_model_relation: adapter"]
    lines += ["tags:"] + [f"- {t}" for t in TAGS]
    languages = facts.get("languages")
    if isinstance(languages, list) and languages and all(isinstance(x, str) for x in languages):
        codes = sorted(set(languages) | {"en"})
        lines += ["language:"] + [f"- {_yaml_str(x)}" for x in codes]
    lines.append("---")
    return lines


def _percent(facts: Mapping[str, Any]) -> float | None:
    n, total = facts.get("trainable_parameters"), facts.get("total_parameters")
    if isinstance(n, int) and isinstance(total, int) and total > 0:
        return 100.0 * n / total
    return None


def _what_was_trained(facts: Mapping[str, Any]) -> list[str]:
    rows: list[tuple[str, str]] = []
    base = facts.get("base_model")
    arch = ", ".join(x for x in (
        str(facts["model_type"]) if facts.get("model_type") else "",
        f"{facts['num_layers']} decoder layers" if facts.get("num_layers") else "") if x)
    if base:
        rows.append(("base model", f"`{base}`" + (f" ({arch})" if arch else "")))
    else:
        withheld = "a local checkpoint (its path is not written here)" if facts.get("base_withheld") else "not recorded"
        rows.append(("base model", withheld + (f"; {arch}" if arch else "")))
    rows.append(("trained layers", _fmt(facts.get("layers", []))))
    matrices = ", ".join(f"`{m}`" for m in facts.get("target_matrices") or [])
    roles = _fmt(facts.get("target_modules", []))
    rows.append(("trained matrices", f"{matrices} (roles: {roles})" if matrices else roles))
    for matrix, parts in (facts.get("partial_fused") or {}).items():
        rows.append(("fused matrix", f"`{matrix}`: only the {', '.join(parts)} rows train (the others stay frozen)"))
    pct = _percent(facts)
    if pct is not None:
        rows.append(("trainable parameters", f"{facts['trainable_parameters']:,} of {facts['total_parameters']:,} "
                                             f"({pct:.4f}%)"))
    dtypes = facts.get("delta_dtypes") or ([facts["delta_dtype"]] if facts.get("delta_dtype") else [])
    if dtypes:
        exact = facts.get("exact")
        how = "" if exact is None else ("; rebuilds the trained weights bit for bit on the same base" if exact
                                        else "; lossy (see `reconstruction` in layerselect_adapter.json)")
        rows.append(("stored deltas", f"{_fmt(dtypes)}{how}"))
    return ["## What was trained", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _how_chosen(facts: Mapping[str, Any]) -> list[str]:
    lines = ["## How the layers were chosen", ""]
    sel = facts.get("selection")
    if not isinstance(sel, Mapping) or not (sel.get("criterion") or sel.get("name")):
        return lines + ["Given by hand (no selection criterion recorded)."]
    criterion = sel.get("criterion") or sel.get("name")
    params = sel.get("params")
    lines.append(f"Chosen by the criterion `{criterion}`"
                 + (f" ({_fmt(params)})" if isinstance(params, Mapping) and params else "")
                 + " of `layerselect select`.")
    reason = sel.get("reason") or sel.get("why") or sel.get("explanation")
    if reason:
        lines += ["", _text(reason)]
    if isinstance(sel.get("threshold"), (int, float)):
        lines += ["", f"Threshold: `{sel['threshold']:.6g}`"]
    scores = sel.get("scores") if isinstance(sel.get("scores"), Mapping) else {}
    notes = sel.get("notes") if isinstance(sel.get("notes"), Mapping) else {}
    chosen = {str(x) for x in facts.get("layers", [])}
    keys = sorted(set(scores) | set(notes), key=lambda k: (int(k) if str(k).isdigit() else 1 << 30, str(k)))
    if keys:
        lines += ["", "| layer | score | selected | note |", "|---:|---:|:---:|---|"]
        for k in keys:
            score = scores.get(k)
            shown = f"{score:.6g}" if isinstance(score, (int, float)) and not isinstance(score, bool) else _fmt(score or "")
            lines.append(f"| {k} | {shown} | {'yes' if str(k) in chosen else ''} | {_fmt(notes.get(k, ''))} |")
    return lines


def _training(facts: Mapping[str, Any]) -> list[str]:
    rows = [(label, _fmt(facts[key])) for key, label in TRAINING_FACTS if facts.get(key) is not None]
    known = {k for k, _ in TRAINING_FACTS} | _ADAPTER_KEYS
    other = [(k, _fmt(v)) for k, v in facts.items() if k not in known and v is not None]
    lines = ["## Training and measurements", ""]
    if not rows and not other:
        return lines + ["Not recorded (pass `card_facts=` to `save_pretrained`; `layerselect train` records them)."]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows + other]
    return lines


def _how_to_use(facts: Mapping[str, Any]) -> list[str]:
    base = facts.get("base_model") or "BASE_MODEL"
    folder = facts.get("adapter_name") or "ADAPTER_DIR"
    return [
        "## How to use it",
        "",
        "This is a layerselect *delta* adapter (`layerselect_adapter.json` + `layerselect_deltas.safetensors`:"
        " `W_trained - W_base` for each trained matrix), not a PEFT adapter. With layerselect"
        " (`pip install layerselect`):",
        "",
        "```python",
        "from layerselect.models import load_model",
        "from layerselect.selective_ffn import SelectiveFFNModel",
        "",
        f"base, tokenizer = load_model({json.dumps(base)})",
        f"model = SelectiveFFNModel.from_pretrained(base, {json.dumps(folder)})  # checks the base's fingerprint",
        "```",
        "",
        "A plain checkpoint, or a standard PEFT LoRA adapter (PEFT, vLLM multi-LoRA serving):",
        "",
        "```bash",
        f"layerselect merge --base {base} --adapter {folder} --out merged/",
        f"layerselect export-lora --adapter {folder} --rank full --out lora/",
        "```",
    ]


def _title(facts: Mapping[str, Any]) -> str:
    base = facts.get("base_model")
    return "# Selective-FFN (SLAM) adapter" + (f" for {base}" if base else "")


def _body(facts: Mapping[str, Any]) -> str:
    layers = facts.get("layers", [])
    roles = set(facts.get("target_modules") or [])
    ffn, attn = bool(roles & {"gate", "up", "down"}), bool(roles & {"q", "k", "v", "o"})
    what = ("FFN matrices and attention projections" if ffn and attn
            else "attention projections" if attn else "FFN matrices")
    intro = (
        f"Made with [layerselect](https://pypi.org/project/layerselect/): only the {what}"
        f" of decoder layer{'s' if len(layers) != 1 else ''} {_fmt(layers)} were fine-tuned, the rest of the"
        " model is unchanged (selective language alignment, SLAM:"
        " *Towards Efficient Multilingual Reasoning via Selective Language Alignment*)."
    )
    parts = [_title(facts), "", intro, "", *_what_was_trained(facts), "", *_how_chosen(facts), "",
             *_training(facts), "", *_how_to_use(facts), ""]
    payload = json.dumps(facts, ensure_ascii=False, sort_keys=True, allow_nan=False)
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e")  # never closes the comment
    parts += [f"{_FACTS_TAG}{payload} -->", ""]
    return "\n".join(parts)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def render_card(facts: Mapping[str, Any]) -> str:
    """The README.md text for ``facts`` (see :func:`adapter_facts`; training facts are free-form).

    Facts are JSON values; absolute paths in them are cut (:func:`public_text`) and
    ``base_model`` is kept only if :func:`public_model_name` accepts it.
    """
    facts = _jsonable(public_text(dict(facts)))
    if facts.get("base_model") is not None and public_model_name(facts["base_model"]) is None:
        facts["base_model"], facts["base_withheld"] = None, True
    front = "\n".join(_front_matter(facts)) + "\n"
    body = _body(facts)
    return front + f"{MARKER} sha256:{_digest(front + body)} -->\n" + body


# ----------------------------------------------------------------------------------------
# Reading a card back
# ----------------------------------------------------------------------------------------
def is_unedited_card(text: str) -> bool:
    """True if ``text`` is a card :func:`render_card` wrote and nobody changed since."""
    m = _MARKER_LINE.search(text)
    if m is None:
        return False
    return _digest(text[: m.start()] + text[m.end():]) == m.group(1)


def card_facts_of(text: str) -> dict[str, Any] | None:
    """The facts stored in a card of ours (None if there are none or they do not parse)."""
    found = _FACTS_LINE.findall(text)
    if not found:
        return None
    try:
        facts = json.loads(found[-1])  # ours is the last line; free text above it is escaped anyway
    except json.JSONDecodeError:
        return None
    return facts if isinstance(facts, dict) else None


def _read_card(path: Path) -> str | None:
    """The text of ``path`` if it is a small UTF-8 file, else None."""
    try:
        if not path.is_file() or path.stat().st_size > _HEAD_BYTES:
            return None
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def user_card(directory: str | os.PathLike[str]) -> Path | None:
    """``directory/README.md`` if it exists and is not an unedited card of ours (the user's: keep it)."""
    path = Path(directory) / CARD_NAME
    if not (path.exists() or path.is_symlink()):
        return None
    text = None if path.is_symlink() else _read_card(path)
    return None if text is not None and is_unedited_card(text) else path


def warn_kept(directory: str | os.PathLike[str], symlink: bool | None = None) -> None:
    """Say (once per folder and process) that a user's README.md was left as it was.

    ``symlink``: whether it was a symbolic link (default: look now).
    """
    key = os.path.abspath(directory)
    if key in _warned:
        return
    _warned.add(key)
    path = Path(directory) / CARD_NAME
    if path.is_symlink() if symlink is None else symlink:
        message = (f"{path} is a symbolic link: it is not followed, so a save over the adapter drops it "
                   "and writes no card (replace it with a file to keep one)")
    else:
        message = (f"{path} was edited or is not a layerselect model card: it was kept as it is and not "
                   "updated (delete it to get a fresh card)")
    warnings.warn(message, UserWarning, stacklevel=3)


def update_model_card(directory: str | os.PathLike[str], facts: Mapping[str, Any]) -> Path | None:
    """Add ``facts`` (training data, steps, losses ...) to the card of the adapter in ``directory``.

    Rewrites README.md with the facts it already holds plus ``facts`` (a card missing
    is rebuilt from ``layerselect_adapter.json``). A README.md the user wrote or edited is
    left untouched (with a warning); returns the card's path, or None when it was left.
    """
    from .._io import atomic_write_text, read_json
    from .adapter_file import CONFIG_NAME

    directory = Path(directory)
    if user_card(directory) is not None:
        warn_kept(directory)
        return None
    path = directory / CARD_NAME
    text = _read_card(path)
    stored = card_facts_of(text) if text is not None else None
    if stored is None:
        stored = facts_from_adapter_meta(read_json(directory / CONFIG_NAME, "the adapter"), directory.name)
    return atomic_write_text(path, render_card({**stored, **facts}))
