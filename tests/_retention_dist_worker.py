"""Worker for tests/test_retention.py: train_slam with a retention guard under torchrun (gloo, CPU).

``python -m torch.distributed.run --nproc_per_node 2 _retention_dist_worker.py KNOWS.pt OUT``: each
process writes ``OUT/rank{r}.json`` with its guard's summary, the step it stopped at and how many
pairs it scored in each measurement.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import layerselect.train.retention as retention  # noqa: E402
from layerselect.selective_ffn import SelectiveFFNConfig  # noqa: E402
from layerselect.train import RetentionGuard, train_slam  # noqa: E402
from test_retention import PAIRS, RETAIN  # noqa: E402
from tiny import end_distributed, tiny_model, tiny_tokenizer  # noqa: E402


def main() -> None:
    knows, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    measured: list[int] = []
    plain = retention.translation_nll_sum

    def counting(model, tokenizer, data, *args, **kwargs):
        measured.append(len(data))
        return plain(model, tokenizer, data, *args, **kwargs)

    retention.translation_nll_sum = counting
    model = tiny_model("llama", dtype=torch.float64)
    model.load_state_dict(torch.load(knows))
    guard = RetentionGuard(RETAIN, tiny_tokenizer(), every=2, verbose=False)
    _, trainer = train_slam(
        model, tiny_tokenizer(), PAIRS, SelectiveFFNConfig(layers=[1]), output_dir=out, max_steps=8,
        per_device_train_batch_size=2, gradient_accumulation_steps=1, learning_rate=1.0, warmup_steps=0,
        lr_scheduler_type="constant", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, data_order="random", precision="fp32", ddp_backend="gloo",
        retain=guard, return_trainer=True,
    )
    rank = torch.distributed.get_rank()
    record = {**guard.summary(), "global_step": trainer.state.global_step, "measured_pairs": measured}
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    end_distributed()


if __name__ == "__main__":
    main()
