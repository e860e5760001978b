"""`get_slam_model` and `SelectiveFFNModel`: train only the FFN matrices (or attention projections) of chosen layers.

The wrapper trains the base model's own weights *in place*: it only flips
``requires_grad`` (everything frozen except the targeted FFN matrices), so the
forward and backward passes are exactly those of the plain model, with no extra
modules, copies or hooks on the hot path (on fused gate/up families with only one
of gate/up targeted, one gradient hook masks the other half's rows).

To save ``delta = W_trained - W_base`` it needs the original targeted matrices.
It keeps them off the accelerator, as a *reference* (:class:`Reference`):

- ``reference="cpu"`` (default): a copy in host RAM, ``sum(targeted bytes)``
  (Llama-2-7B, 6 layers up+down: 541M parameters = 1.08 GB in bf16, 2.2 GB in fp32);
- ``reference="disk"``: the same bytes in a temporary safetensors file, read back
  only when saving / unmerging (no resident memory; disk space instead);
- ``reference=None``: no reference (e.g. on the meta device); saving then fails.

Example:
    >>> from layerselect.selective_ffn import SelectiveFFNConfig, get_slam_model
    >>> model = get_slam_model(base, SelectiveFFNConfig(layers=[0, 1, 2, 3, 4, 5]))  # doctest: +SKIP
    >>> model.print_trainable_parameters()                                             # doctest: +SKIP
    trainable params: 541,065,216 || all params: 6,738,415,616 || trainable%: 8.0295
    >>> model.save_pretrained("adapter/")                                              # doctest: +SKIP
    >>> model = SelectiveFFNModel.from_pretrained(base, "adapter/")                    # doctest: +SKIP
    >>> with model.disable_adapter():                                                  # doctest: +SKIP
    ...     base_logits = model(**batch).logits
    >>> merged = model.merge_and_unload()   # a plain transformers model               # doctest: +SKIP
    >>> import torch
    >>> ref = Reference({"w": torch.ones(2, 2)}, "cpu")
    >>> ref.nbytes, torch.equal(ref.get("w"), torch.ones(2, 2))
    (16, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .._dist import gather_full, is_sharded_parameter
from ..arch import get_layout, unwrap_model
from ..errors import InvalidInputError
from .adapter_file import read_adapter, write_adapter
from .card import adapter_facts
from .config import SelectiveFFNConfig, Target, parameter_numel, resolve_targets
from .delta import compute_delta, dtype_name, fingerprint_tensor, resolve_delta_dtype
from .loading import apply_adapter_tensors, check_base, check_targets_match

__all__ = ["Reference", "ReferenceMode", "SelectiveFFNModel", "get_slam_model"]


# ----------------------------------------------------------------------------------------
# Where the original targeted matrices are kept
# ----------------------------------------------------------------------------------------
ReferenceMode = Literal["cpu", "disk"] | None


class Reference:
    """Original values of the targeted matrices, in host RAM or in a temporary file."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], mode: str):
        self.mode = mode
        self.names = list(tensors)
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self._mem: dict[str, torch.Tensor] = {}
        self._file: Path | None = None
        if mode == "cpu":
            self._mem = {n: gather_full(t) for n, t in tensors.items()}  # one at a time if sharded
        elif mode == "disk":
            tmpdir = Path(tempfile.mkdtemp(prefix="layerselect-ref-"))
            self._finalizer = weakref.finalize(self, shutil.rmtree, tmpdir, True)
            self._file = tmpdir / "reference.safetensors"
            # One tensor at a time would need a streaming writer; targets are small next to the model.
            save_file({n: gather_full(t).contiguous() for n, t in tensors.items()}, str(self._file))
        else:
            raise InvalidInputError(f"reference must be 'cpu', 'disk' or None, got {mode!r}")

    def get(self, name: str) -> torch.Tensor:
        if self._file is None:
            return self._mem[name]
        with safe_open(str(self._file), framework="pt") as fh:
            return fh.get_tensor(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for n in self.names:
            yield n, self.get(n)

    def close(self) -> None:
        self._mem = {}
        if self._file is not None:
            self._finalizer()
            self._file = None


def _rename_legacy_keys(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load wrapper state dicts saved when the wrapped model was stored as ``base_model``."""
    old = prefix + "base_model."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "model." + key[len(old):]] = state_dict.pop(key)


# ----------------------------------------------------------------------------------------
# The wrapper
# ----------------------------------------------------------------------------------------
class SelectiveFFNModel(nn.Module):
    """A causal LM whose only trainable weights are the FFN matrices of selected layers.

    Behaves like the wrapped transformers model: ``forward``/``generate`` delegate
    to it, unknown attributes (``config``, ``device``, ``generation_config`` ...)
    resolve on it. Build one with :func:`get_slam_model` (to train) or
    :meth:`from_pretrained` (to load an adapter onto a base).

    State: the adapter is *merged* (trained weights active, the normal state) or
    *unmerged* (base weights active; see :meth:`unmerge`, :meth:`disable_adapter`).
    """

    def __init__(
        self,
        model: nn.Module,
        config: SelectiveFFNConfig,
        *,
        reference: ReferenceMode = "cpu",
        trainable: bool = True,
    ):
        super().__init__()
        if isinstance(model, SelectiveFFNModel):
            raise InvalidInputError("the model is already a SelectiveFFNModel; wrap the base model once")
        model = unwrap_model(model)
        self.model = model  # the wrapped transformers model, named as in PEFT's tuner classes
        if config.base_model_name_or_path is None:
            name = getattr(getattr(model, "config", None), "name_or_path", None) or None
            config = dataclasses.replace(config, base_model_name_or_path=name)
        self.adapter_config = config
        targets, layout = resolve_targets(model, config)
        self._targets: list[Target] = targets
        self._num_layers = layout.num_layers
        self._family = layout.family
        self._orig_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self._hooks: list[Any] = []
        self._merged = True
        self._stash: dict[str, torch.Tensor] | None = None
        on_meta = any(t.param.device.type == "meta" for t in targets)
        mode = None if on_meta else reference
        self._reference = Reference({t.name: t.param for t in targets}, mode) if mode else None
        self._base_dtypes = {t.name: t.param.dtype for t in targets}
        self._set_trainable(trainable)
        self._register_load_state_dict_pre_hook(_rename_legacy_keys)

    # -- attribute delegation ------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (weights shared, not copied), as in PEFT.

        Example:
            >>> slam.get_base_model() is slam.model   # doctest: +SKIP
            True
        """
        return self.model

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Same as the base model's forward (named arguments keep HF Trainer's column filtering working)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    # -- trainability ----------------------------------------------------------------------
    def _set_trainable(self, trainable: bool) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for p in self.model.parameters():
            p.requires_grad_(False)
        if not trainable:
            return
        for t in self._targets:
            t.param.requires_grad_(True)
            if t.frozen_rows is not None:
                rows = t.frozen_rows

                def _mask(grad: torch.Tensor, rows: tuple[slice, ...] = rows) -> torch.Tensor:
                    grad = grad.clone()
                    for part in rows:
                        grad[part] = 0
                    return grad

                self._hooks.append(t.param.register_hook(_mask))

    def _refresh_parameters(self) -> None:
        """Re-resolve the targeted parameters by name after a wrapper replaced them (FSDP2's
        ``fully_shard`` swaps in ``DTensor`` parameters), and re-apply trainability and hooks."""
        params = dict(self.model.named_parameters())
        for t in self._targets:
            t.param = params[t.name]
        self._set_trainable(any(p.requires_grad for p in params.values()))

    @property
    def target_names(self) -> list[str]:
        """Base-model parameter names of the trained matrices."""
        return [t.name for t in self._targets]

    @property
    def reference_nbytes(self) -> int:
        """Bytes held for the reference copy of the original targeted matrices (0 when on disk or none)."""
        r = self._reference
        return r.nbytes if r is not None and r.mode == "cpu" else 0

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts (masked rows of a fused matrix do not count)."""
        partial = {id(t.param): t for t in self._targets if t.frozen_rows is not None}
        trainable = total = 0
        for p in self.model.parameters():
            n = parameter_numel(p)
            total += n
            if p.requires_grad:
                trainable += partial[id(p)].trainable_numel if id(p) in partial else n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print counts in PEFT's format: ``trainable params: X || all params: Y || trainable%: Z``."""
        trainable, total = self.get_nb_trainable_parameters()
        pct = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")

    # -- trainer / distributed integration -------------------------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Enable gradient checkpointing on the base model and make inputs carry gradients.

        Frozen embeddings produce outputs without ``requires_grad``; the input hook
        keeps gradients flowing to the trainable layers under reentrant checkpointing.
        """
        base = self.model
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
        if hasattr(base, "enable_input_require_grads") and getattr(base, "_require_grads_hook", None) is None:
            base.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Alias of :meth:`activation_checkpointing_enable` (the pre-v5 transformers name)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    # -- merge state ---------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        """True when the trained (adapter) weights are active in the base model."""
        return self._merged

    def _need_reference(self, what: str) -> Any:
        if self._reference is None:
            raise InvalidInputError(
                f"cannot {what}: this SelectiveFFNModel keeps no reference copy of the original weights "
                "(built on the meta device or with reference=None)"
            )
        return self._reference

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the base weights back (exactly), keeping the trained ones aside on CPU for :meth:`merge`."""
        if not self._merged:
            return
        if any(is_sharded_parameter(t.param) for t in self._targets):
            raise InvalidInputError("unmerge / disable_adapter is not supported on a sharded (FSDP2 / ZeRO-3) model")
        ref = self._need_reference("unmerge")
        self._stash = {}
        for t in self._targets:
            self._stash[t.name] = t.param.detach().to("cpu", copy=True)
            t.param.data.copy_(ref.get(t.name).to(t.param.device))
        self._merged = False

    @torch.no_grad()
    def merge(self) -> None:
        """Re-activate the trained weights after :meth:`unmerge`."""
        if self._merged:
            return
        assert self._stash is not None
        for t in self._targets:
            t.param.data.copy_(self._stash[t.name].to(t.param.device))
        self._stash = None
        self._merged = True

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[SelectiveFFNModel]:
        """Context manager in which the model computes with the base weights.

        Only the targeted matrices are swapped (exactly, no copy of the model);
        the trained weights are restored on exit, even after an exception.
        """
        was_merged = self._merged
        self.unmerge()
        try:
            yield self
        finally:
            if was_merged:
                self.merge()

    def merge_and_unload(self) -> nn.Module:
        """Return the base transformers model with the trained weights in place, and release the wrapper.

        The weights already live in the base model, so nothing is copied; the
        reference is freed, gradient hooks removed, and ``requires_grad`` restored
        to what it was before wrapping.
        """
        self.merge()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._orig_requires_grad.get(n, p.requires_grad))
        if self._reference is not None:
            self._reference.close()
            self._reference = None
        return self.model

    # -- saving ----------------------------------------------------------------------------
    def _trained_tensor(self, target: Target, state_dict: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        if not self._merged:
            assert self._stash is not None
            return self._stash[target.name]
        if state_dict is not None:
            for key in (target.name, f"model.{target.name}"):
                if key in state_dict:
                    return state_dict[key]
            for key, value in state_dict.items():  # other wrappers add their own prefixes
                if key.endswith("." + target.name):
                    return value
        return gather_full(target.param)  # one matrix; a collective when sharded

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        state_dict: Mapping[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        *,
        overwrite: bool = False,
        into_existing: bool = False,
        card_facts: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the adapter: ``layerselect_adapter.json`` + ``layerselect_deltas.safetensors`` (deltas only).

        Also writes the model card ``README.md`` (Hub metadata, the layers and how they were
        chosen, matrices, trainable share, how to load it; see :mod:`.card`). ``card_facts``
        adds what only the caller knows, e.g. ``{"train_data": "pairs:DIR", "steps": 300,
        "final_train_loss": 0.57, "heldout_loss_before": 1.10, "heldout_loss_after": 0.57,
        "reasoning_gap": 0.21}``. A README.md the user wrote or edited is kept as it is.

        Atomic: the folder is built whole and swapped in, so on failure a previous
        adapter in ``save_directory`` is untouched and on success no stale file of
        it remains. A non-empty folder that is not an adapter is refused unless
        ``overwrite=True``; ``into_existing=True`` adds the files to a folder that
        others write too (training checkpoints).
        ``state_dict`` (a full, gathered state dict, as HF Trainer passes under
        FSDP / DeepSpeed ZeRO-3) is used for the trained weights when given;
        ``is_main_process=False`` writes nothing. Other keyword arguments
        (``safe_serialization`` ...) are accepted for compatibility and ignored.

        On a sharded model (FSDP2, DeepSpeed ZeRO-3) call it on *every* rank: the
        targeted matrices are gathered one at a time (never the whole model) and
        only the main process, the only one that needs the reference copy, writes.
        """
        collective = state_dict is None and any(is_sharded_parameter(t.param) for t in self._targets)
        if not is_main_process and not collective:
            return
        ref = self._need_reference("save the adapter") if is_main_process else None
        results, fingerprint = {}, {}
        for t in self._targets:
            trained = self._trained_tensor(t, state_dict)
            if ref is None:
                continue  # another rank writes; this one only took part in the gather
            base = ref.get(t.name)
            dd = resolve_delta_dtype(self.adapter_config.delta_dtype, base.dtype)
            results[t.name] = compute_delta(trained.to(base.dtype), base, dd)
            fingerprint[t.name] = fingerprint_tensor(base)
        if ref is None:
            return
        cfg = getattr(self.model, "config", None)
        base_info = {
            "name_or_path": self.adapter_config.base_model_name_or_path,
            "model_type": getattr(cfg, "model_type", None),
            "family": self._family,
            "num_layers": self._num_layers,
            "dtype": dtype_name(next(iter(self._base_dtypes.values()))),
        }
        facts = {**self._card_facts(base_info, Path(save_directory).name), **dict(card_facts or {})}
        write_adapter(save_directory, self.adapter_config, results, self._base_dtypes, base_info, fingerprint,
                      overwrite=overwrite, into_existing=into_existing, card_facts=facts)

    def _card_facts(self, base_info: Mapping[str, Any], adapter_name: str) -> dict[str, Any]:
        """What the model card says about this adapter (trainable counts as configured, whatever
        ``requires_grad`` is now: a loaded, frozen adapter re-saved reports the same share)."""
        roles = self.adapter_config.target_modules
        partial = {}
        for t in self._targets:
            parts = get_layout(self.model).fused_rows(t.layer, t.name.removesuffix(".weight")) if t.frozen_rows else None
            if parts:
                partial[t.name.split(f".{t.layer}.", 1)[-1].removesuffix(".weight")] = [r for r in parts if r in roles]
        return adapter_facts(
            self.adapter_config, base_info, self.target_names,
            trainable=sum(t.trainable_numel for t in self._targets),
            total=sum(parameter_numel(p) for p in self.model.parameters()),
            partial_fused=partial, adapter_name=adapter_name,
        )

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        adapter_path: str | os.PathLike[str],
        is_trainable: bool = False,
        *,
        strict: bool = True,
        scale: float = 1.0,
        reference: ReferenceMode = "cpu",
    ) -> SelectiveFFNModel:
        """Load an adapter onto ``model`` (in place) and wrap it.

        Validates files and base before changing any weight (see
        :func:`~layerselect.selective_ffn.load_deltas`); ``strict=False`` skips
        only the fingerprint check. With ``is_trainable=False`` (default) nothing
        requires grad and the model is put in eval mode; with ``True`` training
        continues from the loaded weights and a later save stores deltas relative
        to the original base. ``scale`` != 1 applies a scaled delta.
        """
        model = unwrap_model(model)
        adapter = read_adapter(adapter_path)
        params = dict(model.named_parameters())
        # Every check runs before the model is touched: a refused load leaves it exactly as it was.
        check_targets_match(adapter, model)
        same_base = check_base(adapter, params, get_layout(model).num_layers, strict=strict)
        deltas = adapter.load_tensors()
        wrapped = cls(model, adapter.config, reference=reference, trainable=is_trainable)
        apply_adapter_tensors(params, adapter, deltas, scale, patch=same_base)
        if not is_trainable:
            wrapped.eval()
        return wrapped

    def extra_repr(self) -> str:
        c = self.adapter_config
        return f"layers={c.layers}, target_modules={c.target_modules}, merged={self._merged}"


def get_slam_model(
    model: nn.Module,
    config: SelectiveFFNConfig,
    *,
    reference: ReferenceMode = "cpu",
) -> SelectiveFFNModel:
    """Freeze everything but the targeted FFN matrices of ``config.layers`` and wrap the model.

    Layers are checked against the model (out of range, duplicates:
    :class:`~layerselect.errors.InvalidInputError`). The weights are trained in
    place; ``reference`` says where the original targeted matrices are kept for
    saving deltas (see the module docstring for the memory cost).

    Example:
        >>> from tiny import tiny_model                                  # doctest: +SKIP
        >>> slam = get_slam_model(tiny_model("llama"), SelectiveFFNConfig(layers=[0, 1]))  # doctest: +SKIP
        >>> slam.target_names[:2]                                        # doctest: +SKIP
        ['model.layers.0.mlp.up_proj.weight', 'model.layers.0.mlp.down_proj.weight']
    """
    if not isinstance(config, SelectiveFFNConfig):
        raise InvalidInputError(f"config must be a SelectiveFFNConfig, got {type(config).__name__}")
    return SelectiveFFNModel(model, config, reference=reference, trainable=True)
