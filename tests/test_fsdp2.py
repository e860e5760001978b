"""FSDP2 (``fully_shard``) SLAM training on 2 gloo CPU processes, checked against single-process runs.

accelerate's FSDP plugin shards only on GPU-type backends, so ``examples/fsdp2_train.py``
shards the model itself (``shard_slam_model``) and hands it to the library's one training
loop (``train_model``), which leaves a pre-sharded model unwrapped. The worker tests drive
``layerselect.distributed`` and ``SelectiveFFNModel.save_pretrained`` directly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from layerselect import ActivationStats
from layerselect.selective_ffn import SelectiveFFNConfig, SelectiveFFNModel, get_slam_model
from tiny import tiny_model, tiny_texts, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fsdp2_train.py"
WORKER = Path(__file__).with_name("_fsdp_worker.py")

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    src = str(ROOT / "src")
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=src + (os.pathsep + path if path else ""), **extra)


def _example(nproc: int, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", _free_port(), str(EXAMPLE), "--model", "tiny-llama", "--layers", "0,1",
            "--max-steps", "4", "--out", str(out), *extra]


def _run_all(*cmds: list[str], env: dict[str, str]) -> None:
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    for proc in procs:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out[-6000:]


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter" / "layerselect_deltas.safetensors"))


def test_fsdp2_example_two_processes_match_one_and_resume(tmp_path):
    env = _env()
    # Same global batch (2 x 2 processes == 4 x 1 process); the 2-process run checkpoints at step 2.
    _run_all(_example(2, tmp_path / "n2", "--batch-size", "2", "--save-steps", "2"),
             _example(1, tmp_path / "n1", "--batch-size", "4"), env=env)
    ckpt = tmp_path / "n2" / "checkpoint-2"
    # Resume the 2-process checkpoint on 2 processes, and on 1 (the checkpoint holds whole tensors).
    _run_all(_example(2, tmp_path / "resumed", "--batch-size", "2", "--resume", str(ckpt)),
             _example(1, tmp_path / "resumed1", "--batch-size", "4", "--resume", str(ckpt)), env=env)
    n2, n1, resumed, resumed1 = (_adapter(tmp_path / d) for d in ("n2", "n1", "resumed", "resumed1"))
    names = {f"model.layers.{i}.mlp.{m}_proj.weight" for i in (0, 1) for m in ("up", "down")}
    assert set(n2) == set(n1) == set(resumed) == set(resumed1) == names
    for name in names:
        assert n1[name].abs().max() > 1e-3, name  # it trained (4 AdamW steps at lr 1e-3)
        # Float32, different batch shapes per process (padding, reduction order): measured rel. 1.7e-6.
        rel = float((n2[name] - n1[name]).norm() / n1[name].norm())
        assert rel < 1e-5, (name, rel)
        # Resume under FSDP (2 steps, checkpoint, 2 more in a new job) == 4 steps straight, bitwise.
        assert torch.equal(resumed[name], n2[name]), name
        rel1 = float((resumed1[name] - n2[name]).norm() / n2[name].norm())
        assert rel1 < 1e-5, (name, rel1)
    summary = json.loads((tmp_path / "resumed" / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["processes"] == 2 and summary["fsdp2_sharded"]
    assert summary["steps"] == 4 and summary["effective_batch_size"] == 4
    # The one checkpoint format of layerselect.train (no checkpoint_state.json of a loop of its own).
    assert {"layerselect_adapter.json", "layerselect_deltas.safetensors", "trainable_weights.safetensors",
            "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    # The optimizer state is whole and keyed by parameter name, not one process's shard.
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
    exp_avg = {k: v["exp_avg"] for k, v in optim["state"].items()}
    assert set(exp_avg) == {f"model.{n}" for n in names} or set(exp_avg) == names, sorted(exp_avg)
    weights = load_file(str(ckpt / "trainable_weights.safetensors"))
    for key, value in exp_avg.items():
        assert value.shape == weights[key.removeprefix("model.") if key not in weights else key].shape
    # The checkpoint's own adapter loads onto a fresh base like any adapter.
    SelectiveFFNModel.from_pretrained(_tiny_llama_from_example(), ckpt)


def _tiny_llama_from_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fsdp2_train", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_tiny("tiny-llama", torch.float32, 0)[0]


@pytest.fixture(scope="module")
def worker_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_worker")
    # A fixed mmap threshold: big tensors are mmapped and returned to the OS when freed, so the
    # resident-set peak measures what is alive (glibc otherwise keeps freed chunks for reuse).
    env = _env(MALLOC_MMAP_THRESHOLD_="65536")
    subprocess.run([sys.executable, str(WORKER), "2", _free_port(), str(out)], check=True, timeout=300, env=env)
    return out


def test_stats_with_fsdp2_sharded_model_equal_one_process(worker_out):
    single = ActivationStats.collect(tiny_model("llama"), tiny_tokenizer(), tiny_texts(5), batch_size=3, progress=False)
    for rank in (0, 1):
        got = ActivationStats.load(worker_out / f"stats{rank}")
        assert got.meta["world_size"] == 2
        assert torch.equal(got.counts, single.counts)
        assert torch.equal(got.tokens, single.tokens)
        torch.testing.assert_close(got.sample_fraction, single.sample_fraction, rtol=0, atol=1e-12)


def test_fsdp2_adapter_equals_single_process_and_saving_never_gathers_the_model(worker_out, tmp_path):
    from _fsdp_worker import BIG, global_batch, train_step

    r0 = json.loads((worker_out / "rank0.json").read_text())
    r1 = json.loads((worker_out / "rank1.json").read_text())
    full = r0["full_bytes"]
    assert full > 100e6 and r0["target_bytes"] < full / 8
    # Saving gathers one targeted matrix at a time. The writing rank grows by the deltas it keeps
    # plus the writer's float64 temporaries for one matrix (measured 35 MB, 3x the 11 MB of targeted
    # weights); the other rank by about one gathered matrix (measured 9 MB). A full copy is 112 MB.
    assert r0["save_increase"] < full / 2, r0
    assert r1["save_increase"] < full / 8, r1
    # Control: gathering a full state dict (what FULL_STATE_DICT saving does) costs a full copy,
    # so the measurement can tell the difference.
    assert r0["control_increase"] > 0.75 * full, r0

    # Independent single process: same model, same global batch, one AdamW step, no sharding.
    model = tiny_model("llama", dtype=torch.float32, **BIG)
    slam = get_slam_model(model, SelectiveFFNConfig(layers=[0, 2]))
    torch.set_num_threads(1)
    train_step(slam, global_batch(BIG["vocab_size"]), 1)
    slam.save_pretrained(tmp_path / "single")
    fsdp = load_file(str(worker_out / "fsdp_adapter" / "layerselect_deltas.safetensors"))
    single = load_file(str(tmp_path / "single" / "layerselect_deltas.safetensors"))
    assert set(fsdp) == set(single) == set(slam.target_names)
    for name in single:
        rel = float((fsdp[name] - single[name]).norm() / single[name].norm())
        assert single[name].abs().max() > 1e-4 and rel < 1e-5, (name, rel)
    # The writer: given the weights FSDP trained, a single process writes byte-identical files.
    trained = load_file(str(worker_out / "trained.safetensors"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in trained:
                param.copy_(trained[name])
    slam.save_pretrained(tmp_path / "same")
    for f in ("layerselect_deltas.safetensors", "layerselect_adapter.json"):
        assert (tmp_path / "same" / f).read_bytes() == (worker_out / "fsdp_adapter" / f).read_bytes(), f


def test_fsdp2_fused_gate_up_keeps_the_frozen_half(worker_out):
    for rank in (0, 1):
        r = json.loads((worker_out / f"rank{rank}.json").read_text())
        assert r["gate_rows_equal"] and r["up_rows_changed"] > 1e-4, r
