"""Worker for tests/test_train_distributed.py: train a tiny model with train_slam and save the adapter.

Run alone (one process) or under ``python -m torch.distributed.run --nproc_per_node N``;
``--per-device`` x processes is the effective batch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from layerselect.data import TranslationExample  # noqa: E402
from layerselect.selective_ffn.config import SelectiveFFNConfig  # noqa: E402
from layerselect.train import train_slam  # noqa: E402
from tiny import end_distributed, tiny_model, tiny_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--per-device", type=int, required=True)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    pairs = [TranslationExample("de", f"Janet hat {i} Enten{'.' * (i % 4)}", f"Janet has {i} ducks{'!' * (i % 3)}")
             for i in range(24)]
    train_slam(
        tiny_model("llama", dtype=torch.float64), tiny_tokenizer(), pairs, SelectiveFFNConfig(layers=[0, 2]),
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.per_device,
        gradient_accumulation_steps=1, learning_rate=1e-2, warmup_steps=0, save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        # length grouping builds its mega-batches from per-device batch x accumulation, so 2 x 2 and
        # 1 x 4 would see other batches; the Trainer's random order gives both the same global batch
        data_order="random",
        **({"ddp_backend": "gloo"} if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}),
    )
    if torch.distributed.is_initialized():
        end_distributed()


if __name__ == "__main__":
    main()
