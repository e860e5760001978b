"""Tiny randomly initialised models of every supported family, and a tiny tokenizer.

Shared by the tests (and usable from benchmarks); nothing here touches the network.
"""

from __future__ import annotations

import functools
import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

# All families used in tests; each has a gated FFN.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")

VOCAB = 320

#: Two fixed token sequences for forward/backward checks on tiny models.
IDS = torch.tensor([[1, 17, 42, 99, 5, 250, 7, 33, 61, 12], [1, 8, 300, 2, 44, 19, 101, 77, 3, 9]])


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if family in ("gemma", "gemma2", "gemma3_text", "qwen3"):
        kwargs["head_dim"] = 8
    if family in ("gemma2", "gemma3_text"):
        kwargs["sliding_window"] = 16
    if family == "gemma3_text":
        kwargs["layer_types"] = ["sliding_attention", "full_attention"] * 2
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str = "llama", dtype: torch.dtype = torch.float64, seed: int = 0, **overrides):
    """A tiny random causal LM of ``family`` in eval mode (float64 by default, for exact tests)."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    # Spread the random weights so roughly half of the neurons fire on a token.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.eval()


_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "El rápido zorro marrón salta sobre el perro perezoso.",
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast.",
    "Mbweha mwepesi wa kahawia anaruka juu ya mbwa mvivu.",
    "敏捷的棕色狐狸跳过了懒狗。",
    "素早い茶色の狐がのろまな犬を飛び越える。",
]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with VOCAB ids: pad=0, bos=1, eos=2; adds BOS to every text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    assert fast.pad_token_id == 0 and fast.bos_token_id == 1 and len(fast) <= VOCAB
    return fast


def tiny_texts(n: int = 6) -> dict[str, list[str]]:
    """Small parallel-ish texts in four 'languages' of different lengths."""
    base = {
        "en": "Janet has {} ducks and sells the eggs at the market every day",
        "de": "Janet hat {} Enten und verkauft die Eier jeden Tag auf dem Markt",
        "sw": "Janet ana bata {} na anauza mayai sokoni kila siku",
        "zh": "珍妮有{}只鸭子,每天在市场上卖鸡蛋",
    }
    return {lang: [tpl.format(i * 7 + 3) + "." * (i % 3) for i in range(n)] for lang, tpl in base.items()}


def tiny_cli_files(root, pairs: int = 12):
    """A saved tiny float32 Llama + tokenizer and a ``pairs:`` folder of German->English pairs, for CLI tests.

    Returns ``(model_dir, train_data_spec)``.
    """
    from pathlib import Path

    root = Path(root)
    folder = root / "pairs" / "de-en"
    folder.mkdir(parents=True)
    (folder / "train.de").write_text("\n".join(f"Janet hat {i} Enten." for i in range(pairs)) + "\n")
    (folder / "train.en").write_text("\n".join(f"Janet has {i} ducks." for i in range(pairs)) + "\n")
    model_dir = root / "model"
    tiny_model("llama", dtype=torch.float32).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    return model_dir, f"pairs:{root / 'pairs'}"


def end_distributed() -> None:
    """End a worker rank: wait for every rank, destroy the group, leave without interpreter teardown.

    gloo's worker threads outlive ``destroy_process_group`` (the group stays referenced outside
    Python); tearing them down at interpreter shutdown now and then aborts a finished rank
    ("terminate called without an active exception"). See docs/training.md (FSDP2).
    """
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
