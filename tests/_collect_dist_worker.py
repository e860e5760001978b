"""Worker for test_collect_distributed: collect on a tiny model under torch.distributed (gloo)."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from layerselect import ActivationStats  # noqa: E402
from tiny import end_distributed, tiny_model, tiny_texts, tiny_tokenizer  # noqa: E402


def main(rank: int, world: int, port: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    stats = ActivationStats.collect(tiny_model("llama"), tiny_tokenizer(), tiny_texts(5), batch_size=3, progress=False,
                                   per_sample_counts=True)  # int16: reduced as int32
    stats.save(os.path.join(out, f"rank{rank}"))
    end_distributed()


if __name__ == "__main__":
    world, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.multiprocessing.spawn(main, args=(world, port, out), nprocs=world)
