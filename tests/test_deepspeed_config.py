"""examples/deepspeed_zero2.json passes DeepSpeed's own config parser once HF Trainer fills the "auto" values.

Skipped when ``deepspeed`` is not installed (``pip install deepspeed`` works on CPU: it builds no ops
at install time; measured with deepspeed 0.19.8). Nothing here trains with DeepSpeed: that needs GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

deepspeed_config = pytest.importorskip("deepspeed.runtime.config", reason="deepspeed is not installed")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "deepspeed_zero2.json"


def _filled(per_device: int, accumulation: int) -> dict:
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    hf = HfTrainerDeepSpeedConfig(json.loads(EXAMPLE.read_text()))
    args = TrainingArguments("unused", per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=accumulation, use_cpu=True, report_to="none")
    hf.trainer_config_process(args)
    return hf.config


def test_zero2_example_is_a_valid_deepspeed_config():
    ds = deepspeed_config.DeepSpeedConfig(_filled(4, 32))
    assert ds.zero_optimization_stage == 2
    # The paper's effective batch on one process: 4 per device x 32 accumulation.
    assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (128, 4, 32)


def test_deepspeed_parser_rejects_an_inconsistent_batch():
    # The parser really checks: a batch that is not micro x accumulation x world size is refused.
    bad = dict(_filled(4, 32), train_batch_size=100)
    with pytest.raises(AssertionError, match="[Bb]atch"):
        deepspeed_config.DeepSpeedConfig(bad)
