"""Greedy generation with the paper's inference prompt: transformers or vLLM.

The prompt is the paper's Table 8 template (:data:`PROMPT_TEMPLATE`); decoding
is greedy, at most ``max_new_tokens`` (512 by default) new tokens, and stops
at EOS or at a stop string that starts a new turn (:data:`DEFAULT_STOP`).
The text returned ends before the stop string.

Two backends share one interface, a callable ``prompts -> responses``:

- :class:`TransformersGenerator`: ``model.generate`` on CPU or GPU, batched
  with *left* padding (so every row continues right after its own prompt);
- :class:`VLLMGenerator`: vLLM for GPU throughput, serving a checkpoint
  directory (a merged adapter is a normal checkpoint). ``vllm`` is imported
  only when used, with a clear error when it is not installed.

Example:
    >>> gen = TransformersGenerator(model, tokenizer, batch_size=8, max_new_tokens=256)  # doctest: +SKIP
    >>> gen([build_prompt("What is 2 + 3?")])                                           # doctest: +SKIP
    [' 2 + 3 = 5. The answer is 5.']
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._running import context_length, pad_batch, pad_token_id, warn_cut_to_context
from ..errors import InvalidInputError
from ..precision import autocast, model_device, model_dtype, resolve_precision

__all__ = [
    "PROMPT_TEMPLATE",
    "DEFAULT_STOP",
    "DEFAULT_MAX_NEW_TOKENS",
    "build_prompt",
    "truncate_at_stop",
    "Generator",
    "TransformersGenerator",
    "VLLMGenerator",
]

#: The paper's inference prompt (Table 8), exactly.
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{query}\n\n"
    "### Response: Let's think step by step."
)
#: Generation stops when the model starts a new instruction/response block.
DEFAULT_STOP: tuple[str, ...] = ("\n\n### Instruction", "### Instruction:", "\n\n### Response")
DEFAULT_MAX_NEW_TOKENS = 512

#: Anything mapping a list of prompts to a list of responses.
Generator = Callable[[Sequence[str]], list[str]]


def build_prompt(query: str, template: str = PROMPT_TEMPLATE) -> str:
    """Fill the inference prompt.

    Example:
        >>> build_prompt("1+1?").endswith("### Instruction:\\n1+1?\\n\\n### Response: Let's think step by step.")
        True
    """
    return template.format(query=query)


def truncate_at_stop(text: str, stop: Sequence[str] = DEFAULT_STOP) -> str:
    """``text`` up to the first occurrence of any stop string.

    Example:
        >>> truncate_at_stop("So 18.\\n\\n### Instruction:\\nMore")
        'So 18.'
    """
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


class TransformersGenerator:
    """Greedy batched generation with ``model.generate`` and left padding.

    Args:
        model: a causal LM (any device; inputs are moved to it).
        tokenizer: its tokenizer; a missing pad token falls back to EOS.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: hard limit per response.
        stop: stop strings; the response is cut before the first one.
        precision: ``"fp32"`` (default), ``"bf16"`` autocast or ``"auto"`` (bf16 where the
            hardware is fast at it; :mod:`layerselect.precision`).
        warn_cut: warn when prompts are cut to the model's context (below); the count
            is kept in ``self.truncated_prompts`` either way.

    Generation stays inside the model's positions (``config.max_position_embeddings``):
    a prompt longer than the context minus the room for the answer (``max_new_tokens``,
    at most half the context) loses its *beginning* (the end holds the question's last
    words and the response cue), and a batch whose longest prompt leaves fewer than
    ``max_new_tokens`` positions generates only up to the context.

    Example:
        >>> from tiny import tiny_model, tiny_tokenizer  # doctest: +SKIP
        >>> TransformersGenerator(tiny_model(), tiny_tokenizer(), max_new_tokens=8)(["a", "b"])  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        stop: Sequence[str] = DEFAULT_STOP,
        precision: str = "fp32",
        warn_cut: bool = True,
    ) -> None:
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if tokenizer is None:
            raise InvalidInputError("the transformers backend needs the model's tokenizer")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(stop)
        self.pad_token_id = pad_token_id(tokenizer, required=True)
        self.precision = resolve_precision(precision, model_device(self.model), model_dtype(model))
        self.warn_cut = warn_cut
        self.truncated_prompts = 0  # prompts cut to the model's context so far

    def prompt_room(self) -> int | None:
        """How many prompt tokens fit before the answer's room in the model's context (None: no limit)."""
        limit = context_length(self.model)
        return None if limit is None else max(1, limit - min(self.max_new_tokens, limit // 2))

    def count_cut(self, prompts: Sequence[str]) -> tuple[int, int]:
        """``(how many of prompts would be cut to the context, the longest one in tokens)``; nothing runs."""
        room = self.prompt_room()
        lengths = [len(x) for x in self.tokenizer(list(prompts))["input_ids"]] if room is not None else []
        return sum(n > room for n in lengths) if room is not None else 0, max(lengths, default=0)

    def _fit_context(self, encoded: list[list[int]]) -> tuple[list[list[int]], int]:
        """Prompts cut to the model's context (keeping their ends), and the new tokens that still fit."""
        limit, keep = context_length(self.model), self.prompt_room()
        if limit is None or keep is None:
            return encoded, self.max_new_tokens
        cut = sum(len(x) > keep for x in encoded)
        if cut:
            longest = max(len(x) for x in encoded)
            encoded = [x[-keep:] for x in encoded]
            self.truncated_prompts += cut
            if self.warn_cut:
                warn_cut_to_context(cut, len(encoded), limit, longest, "prompts", stacklevel=4)
        return encoded, max(1, min(self.max_new_tokens, limit - max(len(x) for x in encoded)))

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[str]) -> list[str]:
        """One ``generate`` call over ``prompts`` (left padded)."""
        tok = self.tokenizer
        encoded, new_tokens = self._fit_context([list(x) for x in tok(list(prompts))["input_ids"]])
        ids, mask = pad_batch(encoded, self.pad_token_id, padding_side="left")
        device = model_device(self.model)
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = tok.eos_token_id
        # transformers stops a row once its text ends with a stop string; the cut below removes it.
        stop_strings = [s for s in self.stop if s] or None
        with autocast(self.precision, device):
            out = self._generate(ids.to(device), mask.to(device), eos, stop_strings, new_tokens)
        texts = tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        return [truncate_at_stop(t, self.stop) for t in texts]

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, eos: Any, stop_strings: list[str] | None,
                  max_new_tokens: int | None = None) -> Any:
        tok = self.tokenizer
        return self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            pad_token_id=self.pad_token_id,
            eos_token_id=eos,
            stop_strings=stop_strings,
            tokenizer=tok,
        )

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        out: list[str] = []
        for i in range(0, len(prompts), self.batch_size):
            out.extend(self.generate_batch(prompts[i : i + self.batch_size]))
        return out


class VLLMGenerator:
    """Greedy generation with vLLM (GPU); serves ``model_path`` as a normal checkpoint.

    ``llm_kwargs`` go to ``vllm.LLM`` (e.g. ``tensor_parallel_size=2``,
    ``gpu_memory_utilization=0.8``, ``dtype="bfloat16"``).

    Example:
        >>> gen = VLLMGenerator("merged_model/", max_new_tokens=512)  # doctest: +SKIP
        >>> gen([build_prompt("What is 2 + 3?")])                     # doctest: +SKIP
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        stop: Sequence[str] = DEFAULT_STOP,
        **llm_kwargs: Any,
    ) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise InvalidInputError(
                "the vllm backend needs the vllm package (a CUDA GPU machine): pip install vllm; "
                "or use backend='transformers'"
            ) from exc
        self.stop = tuple(stop)
        self.params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=list(self.stop))
        self.llm = vllm.LLM(model=str(model_path), **llm_kwargs)

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        outputs = self.llm.generate(list(prompts), self.params, use_tqdm=False)
        return [truncate_at_stop(o.outputs[0].text, self.stop) for o in outputs]
