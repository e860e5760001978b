import socket
import subprocess
import sys
from pathlib import Path

import torch

from layerselect import ActivationStats
from tiny import tiny_model, tiny_texts, tiny_tokenizer


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_two_gloo_ranks_give_the_single_process_statistics(tmp_path):
    worker = Path(__file__).with_name("_collect_dist_worker.py")
    subprocess.run([sys.executable, str(worker), "2", _free_port(), str(tmp_path)], check=True, timeout=300)
    single = ActivationStats.collect(tiny_model("llama"), tiny_tokenizer(), tiny_texts(5), batch_size=3, progress=False,
                                   per_sample_counts=True)
    for rank in (0, 1):
        got = ActivationStats.load(tmp_path / f"rank{rank}")
        assert got.meta["world_size"] == 2
        # Each rank saw only half of the batches, yet after the all-reduce both hold everything.
        assert torch.equal(got.counts, single.counts)
        assert torch.equal(got.tokens, single.tokens)
        torch.testing.assert_close(got.sample_fraction, single.sample_fraction, rtol=0, atol=1e-12)
        assert (got.sample_fraction > 0).all()
        assert got.sample_counts.dtype == single.sample_counts.dtype
        assert torch.equal(got.sample_counts, single.sample_counts)
