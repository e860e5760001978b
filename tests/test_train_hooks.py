"""What train_slam relies on in transformers: the warmup of the paper defaults, and the private
Trainer methods SLAMTrainer overrides (their signatures, and that the Trainer really calls them)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

from layerselect.data import TranslationExample
from layerselect.selective_ffn.config import SelectiveFFNConfig
from layerselect.train import (
    PAPER_DEFAULTS,
    TRAINABLE_WEIGHTS_NAME,
    SLAMTrainer,
    default_training_args,
    train_slam,
)
from layerselect.train.arguments import warmup_arguments
from layerselect.train.trainer import PRIVATE_TRAINER_HOOKS
from tiny import tiny_model, tiny_tokenizer

# Tiny matmuls: threads only add contention on a shared CPU.
pytestmark = pytest.mark.usefixtures("single_thread")


def _pairs(n: int = 8) -> list[TranslationExample]:
    return [TranslationExample("de", f"Janet hat {i} Enten.", f"Janet has {i} ducks.") for i in range(n)]


def test_paper_warmup_is_three_percent_of_the_steps_on_the_installed_transformers(tmp_path):
    assert PAPER_DEFAULTS["warmup_steps"] == 0.03
    args = default_training_args(tmp_path, use_cpu=True)
    for steps in (100, 1000, 4000):
        assert args.get_warmup_steps(steps) == math.ceil(0.03 * steps)


def test_warmup_fraction_becomes_warmup_ratio_before_transformers_5():
    assert warmup_arguments(0.03, "4.56.0") == {"warmup_ratio": 0.03}
    assert warmup_arguments(0.03, "4.57.6") == {"warmup_ratio": 0.03}
    assert warmup_arguments(0.03, "5.0.0") == {"warmup_steps": 0.03}
    assert warmup_arguments(0.03, "5.24.0") == {"warmup_steps": 0.03}
    for version in ("4.56.0", "5.24.0"):  # whole step counts, and no warmup, mean the same everywhere
        assert warmup_arguments(10, version) == {"warmup_steps": 10}
        assert warmup_arguments(0, version) == {"warmup_steps": 0}


def test_the_scheduler_warms_up_over_three_percent_then_follows_the_cosine(tmp_path):
    steps, peak = 100, 1e-3
    _, trainer = train_slam(tiny_model("llama", dtype=torch.float32), tiny_tokenizer(), _pairs(),
                            SelectiveFFNConfig(layers=[1]), output_dir=tmp_path, max_steps=steps,
                            learning_rate=peak, per_device_train_batch_size=1, gradient_accumulation_steps=1,
                            save_strategy="no", use_cpu=True, disable_tqdm=True, return_trainer=True)
    logged = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert len(logged) == steps
    warm = math.ceil(0.03 * steps)  # 3 steps

    def expected(i: int) -> float:  # the rate of update i+1: linear warmup, then half a cosine to 0
        if i < warm:
            return peak * i / warm
        return peak * 0.5 * (1 + math.cos(math.pi * (i - warm) / (steps - warm)))

    assert logged[0] == 0.0 and logged[warm] == pytest.approx(peak)
    assert all(logged[i] < logged[i + 1] for i in range(warm))
    for i, lr in enumerate(logged):
        assert lr == pytest.approx(expected(i), rel=1e-9, abs=1e-15), i


@pytest.mark.parametrize("name", sorted(PRIVATE_TRAINER_HOOKS))
def test_the_private_trainer_methods_we_override_still_exist_with_these_parameters(name):
    # SLAMTrainer overrides these (no public hook does the job, see layerselect/train/trainer.py);
    # a transformers release that renames or reshapes one fails here, not silently in a checkpoint.
    theirs = getattr(Trainer, name, None)
    assert theirs is not None, f"transformers.Trainer has no {name} any more"
    assert tuple(inspect.signature(theirs).parameters) == PRIVATE_TRAINER_HOOKS[name]
    assert name in vars(SLAMTrainer)
    assert tuple(inspect.signature(getattr(SLAMTrainer, name)).parameters) == PRIVATE_TRAINER_HOOKS[name]


def test_load_best_model_at_end_restores_the_best_checkpoints_trainable_weights(tmp_path):
    # "Best" = highest eval loss, so with a falling loss it is the first checkpoint, not the last.
    model = tiny_model("llama", dtype=torch.float32)
    pairs = _pairs(12)
    _, trainer = train_slam(model, tiny_tokenizer(), pairs, SelectiveFFNConfig(layers=[1]), output_dir=tmp_path,
                            eval_dataset=pairs[:4], max_steps=6, learning_rate=1e-2, warmup_steps=0,
                            per_device_train_batch_size=4, gradient_accumulation_steps=1, use_cpu=True,
                            disable_tqdm=True, eval_strategy="steps", eval_steps=2, save_steps=2,
                            save_total_limit=None, load_best_model_at_end=True, metric_for_best_model="loss",
                            greater_is_better=True, return_trainer=True)
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert len(evals) == 3 and evals[0] > evals[-1]
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best = load_file(str(tmp_path / "checkpoint-2" / TRAINABLE_WEIGHTS_NAME))
    last = load_file(str(tmp_path / "checkpoint-6" / TRAINABLE_WEIGHTS_NAME))
    params = dict(model.named_parameters())
    assert set(best) == {"model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    for name, value in best.items():
        assert torch.equal(params[name].detach(), value), name
        assert not torch.equal(value, last[name]), name
    adapter = load_file(str(tmp_path / "adapter" / "layerselect_deltas.safetensors"))
    base = dict(tiny_model("llama", dtype=torch.float32).named_parameters())
    for name, value in best.items():  # the final adapter is the best checkpoint's, as a delta
        assert torch.allclose(adapter[name].float(), value - base[name].detach(), atol=1e-6), name
