"""Worker for tests/test_fsdp2.py: FSDP2 (fully_shard) on 2 gloo CPU processes.

``python _fsdp_worker.py WORLD PORT OUT`` spawns WORLD ranks; each writes ``OUT/rank{r}.json`` plus
files the test compares with single-process computations:

- ``stats{r}/``: ActivationStats collected with the model sharded;
- ``fsdp_adapter/`` (rank 0): the adapter saved under FSDP after one training step, and
  ``trained.safetensors``: the trained matrices gathered after saving;
- peak memory (VmHWM after resetting it) while saving the adapter, and while gathering a
  full state dict (the control: what saving must not cost);
- a fused gate_up model (phi3) with only ``up`` trained: the gate half must stay frozen.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from layerselect import ActivationStats  # noqa: E402
from layerselect.distributed import gather_full, shard_slam_model, trainable_parameters  # noqa: E402
from layerselect.selective_ffn import SelectiveFFNConfig, get_slam_model  # noqa: E402
from tiny import end_distributed, tiny_model, tiny_texts, tiny_tokenizer  # noqa: E402

#: Large enough that a full copy (~116 MB in float32) stands far above allocator noise.
BIG = dict(vocab_size=16000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
           num_attention_heads=8, num_key_value_heads=4)


def global_batch(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(3, vocab, (4, 16), generator=g)


def train_step(slam, ids: torch.Tensor, world: int) -> None:
    """One SGD step (linear in the gradient, so comparable across runs; AdamW's first step is a sign
    function that amplifies rounding); the loss is the mean over the *global* batch (FSDP averages
    gradients over ranks)."""
    opt = torch.optim.SGD(trainable_parameters(slam), lr=0.05)
    out = slam(input_ids=ids)
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).sum()
    (nll * world / (4 * 15)).backward()
    opt.step()


def _mem() -> dict[str, int]:
    with open("/proc/self/status") as fh:
        return {k: int(v.split()[0]) * 1024 for k, v in (ln.split(":", 1) for ln in fh) if k in ("VmRSS", "VmHWM")}


def peak_increase(fn) -> int:
    """Bytes the resident set grew above its starting point while ``fn`` ran (Linux VmHWM, reset first)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _mem()["VmRSS"]
    fn()
    return _mem()["VmHWM"] - before


def main(rank: int, world: int, port: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    result: dict = {}

    # 1. statistics with the model sharded (7 batches: the ranks get 4 and 3 -> unequal forward counts)
    model = tiny_model("llama")
    slam = shard_slam_model(get_slam_model(model, SelectiveFFNConfig(layers=[0])))
    stats = ActivationStats.collect(slam.model, tiny_tokenizer(), tiny_texts(5), batch_size=3, progress=False)
    stats.save(os.path.join(out, f"stats{rank}"))

    # 2. adapter under FSDP: gathers one matrix at a time; peak memory vs a full-state-dict gather
    model = tiny_model("llama", dtype=torch.float32, **BIG)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    slam = shard_slam_model(get_slam_model(model, SelectiveFFNConfig(layers=[0, 2])))
    del model
    ids = global_batch(BIG["vocab_size"])
    train_step(slam, ids[rank * 4 // world:(rank + 1) * 4 // world], world)
    adapter_dir = os.path.join(out, "fsdp_adapter")
    result["save_increase"] = peak_increase(lambda: slam.save_pretrained(adapter_dir, is_main_process=rank == 0))
    result["target_bytes"] = sum(t.param.numel() * t.param.element_size() for t in slam._targets)
    result["full_bytes"] = full_bytes

    def gather_everything() -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(slam.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        result["control_keys"] = len(full)

    result["control_increase"] = peak_increase(gather_everything)
    trained = {t.name: gather_full(t.param) for t in slam._targets}
    if rank == 0:
        from safetensors.torch import save_file

        save_file(trained, os.path.join(out, "trained.safetensors"))

    # 3. fused gate_up (phi3) with only up (and down) trained: the gate rows get no update
    model = tiny_model("phi3", dtype=torch.float32)
    name = "model.layers.1.mlp.gate_up_proj.weight"
    before = dict(model.named_parameters())[name].detach().clone()
    slam = shard_slam_model(get_slam_model(model, SelectiveFFNConfig(layers=[1])))
    train_step(slam, global_batch(320)[rank * 4 // world:(rank + 1) * 4 // world], world)
    after = gather_full(dict(slam.model.named_parameters())[name])
    half = before.shape[0] // 2
    result["gate_rows_equal"] = bool(torch.equal(after[:half], before[:half]))
    result["up_rows_changed"] = float((after[half:] - before[half:]).abs().max())

    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    end_distributed()


if __name__ == "__main__":
    world, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.multiprocessing.spawn(main, args=(world, port, out), nprocs=world)
