"""Architecture layouts: where each model family keeps its gated FFN.

The rest of the library never names a model family. It asks this module, for a
loaded model, for the decoder layers and, in each, the module whose output is
``f(W_gate x)`` (the activation that decides whether a neuron *fired*), the
FFN weight matrices, and the attention projections (roles ``q``, ``k``, ``v``,
``o``; for the paper's sub-layer ablation), including fused ``qkv`` matrices.

Adding a family is one entry in :data:`FAMILIES`. Models of unknown families
are handled by introspection (:func:`_infer_spec`) when their FFN uses any of
the usual names; a model without a gated FFN gets an error naming what was found.

Example:
    >>> from layerselect.arch import get_layout
    >>> layout = get_layout(model)                       # doctest: +SKIP
    >>> layout.num_layers, layout.intermediate_size      # doctest: +SKIP
    (18, 2048)
    >>> layout.parameter_names(3, ["up", "down"])        # doctest: +SKIP
    ['model.layers.3.mlp.up_proj.weight', 'model.layers.3.mlp.down_proj.weight']
    >>> layout.parameter_names(3, ["q", "o"])            # doctest: +SKIP
    ['model.layers.3.self_attn.q_proj.weight', 'model.layers.3.self_attn.o_proj.weight']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from .errors import InvalidInputError, UnsupportedArchitectureError

__all__ = [
    "AttnSpec", "FFNSpec", "FFN", "ModelLayout", "FAMILIES", "ROLES", "ATTN_ROLES", "TARGET_ROLES",
    "LMHeadSpec", "LM_HEADS", "get_layout", "lm_head_spec", "normalize_target_modules", "unwrap_model",
]

#: Canonical names of the FFN matrices, whatever a family calls them.
ROLES: tuple[str, ...] = ("gate", "up", "down")
#: Canonical names of the attention projections.
ATTN_ROLES: tuple[str, ...] = ("q", "k", "v", "o")
#: Every role a selective model can train, in canonical order.
TARGET_ROLES: tuple[str, ...] = ROLES + ATTN_ROLES

# Names users may give for the FFN matrices and attention projections -> canonical roles
# (ROLES, ATTN_ROLES). "all" keeps its original meaning: every FFN matrix.
_ALIASES: dict[str, tuple[str, ...]] = {
    "gate": ("gate",),
    "gate_proj": ("gate",),
    "w1": ("gate",),
    "up": ("up",),
    "up_proj": ("up",),
    "w3": ("up",),
    "down": ("down",),
    "down_proj": ("down",),
    "w2": ("down",),
    "gate_up": ("gate", "up"),
    "gate_up_proj": ("gate", "up"),
    "all": ROLES,
    "ffn": ROLES,
    "mlp": ROLES,
    "q": ("q",),
    "q_proj": ("q",),
    "k": ("k",),
    "k_proj": ("k",),
    "v": ("v",),
    "v_proj": ("v",),
    "o": ("o",),
    "o_proj": ("o",),
    "qkv": ("q", "k", "v"),
    "qkv_proj": ("q", "k", "v"),
    "attn": ATTN_ROLES,
    "attention": ATTN_ROLES,
    "self_attn": ATTN_ROLES,
}


def normalize_target_modules(
    targets: str | Iterable[str], what: str = "SelectiveFFNConfig.target_modules"
) -> list[str]:
    """Map user names to canonical roles, in :data:`TARGET_ROLES` order.

    FFN: ``"up_proj"``, ``"gate_up_proj"``, ``"ffn"``/``"all"`` (gate+up+down);
    attention: ``"q"``, ``"k_proj"``, ``"qkv"``, ``"attn"`` (q+k+v+o). ``what`` names
    the setting in messages.

    Example:
        >>> normalize_target_modules(["o_proj", "up"])
        ['up', 'o']
    """
    if isinstance(targets, str):
        targets = [targets]
    roles: set[str] = set()
    for t in targets:
        if not isinstance(t, str) or t.lower() not in _ALIASES:
            raise InvalidInputError(f"unknown target {t!r} in {what}; use some of {sorted(_ALIASES)}")
        roles.update(_ALIASES[t.lower()])
    if not roles:
        raise InvalidInputError(f"{what} is empty; the default is ['up', 'down']")
    return [r for r in TARGET_ROLES if r in roles]


@dataclass(frozen=True)
class AttnSpec:
    """Attribute names of a family's attention projections, relative to one decoder layer.

    ``qkv`` is set for families that fuse the query, key and value projections
    into one matrix (rows: all query heads, then key heads, then value heads, as
    in Phi-3); ``q``/``k``/``v`` are then None.
    """

    attn: str = "self_attn"
    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None

    @property
    def fused(self) -> bool:
        return self.qkv is not None


@dataclass(frozen=True)
class FFNSpec:
    """Attribute names of a family's gated FFN, relative to one decoder layer.

    ``gate_up`` is set for families that fuse the gate and up projections into
    one matrix (gate rows first, as in Phi-3); ``gate``/``up`` are then None.
    """

    mlp: str = "mlp"
    act: str = "act_fn"
    gate: str | None = "gate_proj"
    up: str | None = "up_proj"
    down: str = "down_proj"
    gate_up: str | None = None
    attention: AttnSpec = AttnSpec()

    @property
    def fused(self) -> bool:
        return self.gate_up is not None


_LLAMA_STYLE = FFNSpec()

#: model_type -> FFN layout. Llama-style families all share one layout; the
#: table still lists them so that "supported" is explicit and greppable.
FAMILIES: dict[str, FFNSpec] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "gemma": _LLAMA_STYLE,
    "gemma2": _LLAMA_STYLE,
    "gemma3": _LLAMA_STYLE,
    "gemma3_text": _LLAMA_STYLE,
    "phi3": FFNSpec(act="activation_fn", gate=None, up=None, gate_up="gate_up_proj",
                    attention=AttnSpec(q=None, k=None, v=None, qkv="qkv_proj")),
}

@dataclass(frozen=True)
class LMHeadSpec:
    """How a family turns its decoder trunk's output into logits (used by :mod:`layerselect.loss`).

    ``logits = softcap(lm_head(trunk(...)[0]))``: ``trunk`` is the attribute of the
    causal-LM class holding the decoder stack, whose first output is the final,
    normalised hidden state; ``lm_head`` is the model's ``get_output_embeddings()``
    (tied or not); ``softcap`` names the config attribute of final-logit tanh
    soft-capping (``cap * tanh(logits / cap)``, skipped when the value is None), or
    is None for families that use the head's output as is.
    """

    trunk: str = "model"
    softcap: str | None = None


_PLAIN_HEAD = LMHeadSpec()
_SOFTCAP_HEAD = LMHeadSpec(softcap="final_logit_softcapping")

#: model_type -> final-logit processing, checked against each family's ``*ForCausalLM.forward``.
#: A family missing here (e.g. Granite's ``logits_scaling``, Cohere's ``logit_scale``) makes the
#: label-only loss fall back to the standard full-logits path.
LM_HEADS: dict[str, LMHeadSpec] = {
    "llama": _PLAIN_HEAD,
    "mistral": _PLAIN_HEAD,
    "qwen2": _PLAIN_HEAD,
    "qwen3": _PLAIN_HEAD,
    "gemma": _PLAIN_HEAD,
    "gemma2": _SOFTCAP_HEAD,
    "gemma3_text": _SOFTCAP_HEAD,
    "phi3": _PLAIN_HEAD,
}


def lm_head_spec(model: nn.Module) -> LMHeadSpec | None:
    """The :class:`LMHeadSpec` of a loaded model's family (unwrapping wrappers), or None if unknown."""
    config = getattr(unwrap_model(model), "config", None)
    return LM_HEADS.get(getattr(config, "model_type", None) or "")


# Where decoder layers live, tried in order (CausalLM, multimodal wrappers, bare models).
_LAYER_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "language_model.layers",
    "layers",
)

# Name candidates for the introspection fallback.
_GATE_NAMES = ("gate_proj", "w1", "gate", "wi_0")
_UP_NAMES = ("up_proj", "w3", "up", "wi_1")
_DOWN_NAMES = ("down_proj", "w2", "down", "wo")
_ACT_NAMES = ("act_fn", "activation_fn", "act", "activation")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_ATTN_NAMES = ("self_attn", "attention", "attn", "self_attention")
_Q_NAMES, _K_NAMES, _V_NAMES = ("q_proj", "wq", "query"), ("k_proj", "wk", "key"), ("v_proj", "wv", "value")
_O_NAMES = ("o_proj", "out_proj", "wo", "dense")
_QKV_NAMES = ("qkv_proj", "Wqkv", "query_key_value")


def target_parameter_suffixes(roles: Sequence[str]) -> set[tuple[str, str]]:
    """Every ``(block module, matrix attribute)`` pair that may hold one of ``roles`` in any family.

    Lets a reader check the tensor names inside an adapter file against its
    config without a model at hand (``merge`` streams a checkpoint): FFN roles
    live under an FFN block (``mlp`` ...), attention roles under an attention
    block (``self_attn`` ...), under any family's or the fallback's names.
    """
    specs = list(FAMILIES.values())
    ffn_blocks = {s.mlp for s in specs} | set(_MLP_NAMES)
    attn_blocks = {s.attention.attn for s in specs} | set(_ATTN_NAMES)
    fallback = {"gate": _GATE_NAMES, "up": _UP_NAMES, "down": _DOWN_NAMES,
                "q": _Q_NAMES, "k": _K_NAMES, "v": _V_NAMES, "o": _O_NAMES}
    out: set[tuple[str, str]] = set()
    for role in roles:
        if role not in fallback:
            continue
        names = set(fallback[role])
        for spec in specs:
            if role in ROLES:
                names.add({"gate": spec.gate or spec.gate_up, "up": spec.up or spec.gate_up, "down": spec.down}[role])
            else:
                a = spec.attention
                names.add({"q": a.q or a.qkv, "k": a.k or a.qkv, "v": a.v or a.qkv, "o": a.o}[role])
        if role in ("gate", "up"):
            names.add("gate_up_proj")
        if role in ("q", "k", "v"):
            names.update(_QKV_NAMES)
        blocks = ffn_blocks if role in ROLES else attn_blocks
        out.update((b, n) for b in blocks for n in names if n)
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the transformers model inside our wrapper, a PEFT model, or a DDP wrapper (``.module``)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        getter = getattr(model, "get_base_model", None)
        inner = getter() if callable(getter) else getattr(model, "module", None)
        if isinstance(inner, nn.Module) and inner is not model:
            model = inner
        else:
            break
    return model


@dataclass
class FFN:
    """Handles on one decoder layer's FFN."""

    index: int
    layer: nn.Module
    mlp: nn.Module
    act: nn.Module
    gate: nn.Linear | None
    up: nn.Linear | None
    down: nn.Linear
    gate_up: nn.Linear | None = None


class ModelLayout:
    """Answers structural questions about one loaded model (see module docstring)."""

    def __init__(self, model: nn.Module, family: str, spec: FFNSpec, layers_path: str):
        self.model = model
        self.family = family
        self.spec = spec
        self.layers_path = layers_path
        self.layers: nn.ModuleList = _get_path(model, layers_path)

    def __repr__(self) -> str:
        return (
            f"ModelLayout(family={self.family!r}, layers={self.layers_path!r} x{self.num_layers}, "
            f"intermediate_size={self.intermediate_size}, fused={self.spec.fused})"
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def intermediate_size(self) -> int:
        return self.ffn(0).down.in_features

    def check_layers(self, layers: Sequence[int]) -> list[int]:
        """Validate layer indices: in range, no duplicates; returns them sorted."""
        out = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise InvalidInputError(f"layer index {layer!r} is not an integer")
            if not 0 <= layer < self.num_layers:
                raise InvalidInputError(
                    f"layer {layer} is out of range: this {self.family} model has "
                    f"{self.num_layers} decoder layers (valid: 0..{self.num_layers - 1})"
                )
            out.append(layer)
        if len(set(out)) != len(out):
            dup = sorted({x for x in out if out.count(x) > 1})
            raise InvalidInputError(f"duplicate layer indices {dup}; list each layer once")
        return sorted(out)

    def ffn(self, index: int) -> FFN:
        layer = self.layers[index]
        s = self.spec
        mlp = getattr(layer, s.mlp)
        return FFN(
            index=index,
            layer=layer,
            mlp=mlp,
            act=getattr(mlp, s.act),
            gate=getattr(mlp, s.gate) if s.gate else None,
            up=getattr(mlp, s.up) if s.up else None,
            down=getattr(mlp, s.down),
            gate_up=getattr(mlp, s.gate_up) if s.gate_up else None,
        )

    def attention_spec(self) -> AttnSpec:
        """Where this family keeps its attention projections (checked on layer 0)."""
        spec = self.spec.attention
        layer = self.layers[0]
        attn = getattr(layer, spec.attn, None)
        wanted = [spec.o, *((spec.qkv,) if spec.fused else (spec.q, spec.k, spec.v))]
        if isinstance(attn, nn.Module) and all(isinstance(getattr(attn, n, None), nn.Module) for n in wanted):
            return spec
        return _infer_attention(layer, self.layers_path)

    def module_names(self, index: int, roles: Sequence[str]) -> list[str]:
        """Qualified module names (relative to the adapted model) of the given roles.

        FFN roles ``gate``/``up``/``down`` and attention roles ``q``/``k``/``v``/``o``.
        On a fused family, ``gate`` and ``up`` both name the fused gate_up matrix
        and ``q``/``k``/``v`` the fused qkv matrix (each listed once).
        """
        s = self.spec
        names: list[str] = []
        for role in roles:
            if role in ROLES:
                attr = {"gate": s.gate or s.gate_up, "up": s.up or s.gate_up, "down": s.down}[role]
                name = f"{self.layers_path}.{index}.{s.mlp}.{attr}"
            elif role in ATTN_ROLES:
                a = self.attention_spec()
                attr = {"q": a.q or a.qkv, "k": a.k or a.qkv, "v": a.v or a.qkv, "o": a.o}[role]
                name = f"{self.layers_path}.{index}.{a.attn}.{attr}"
            else:
                raise InvalidInputError(f"unknown target role {role!r}; use some of {list(TARGET_ROLES)}")
            if name not in names:
                names.append(name)
        return names

    def fused_rows(self, index: int, module_name: str) -> dict[str, slice] | None:
        """Rows of each role inside a fused matrix (``gate_up`` or ``qkv``); None when not fused.

        gate_up: gate rows first, then up (halves). qkv: query heads, key heads, value heads
        (``num_attention_heads * head_dim`` query rows, the rest split evenly between k and v).

        Example:
            >>> layout.fused_rows(0, "model.layers.0.self_attn.qkv_proj")   # doctest: +SKIP
            {'q': slice(0, 3072), 'k': slice(3072, 6144), 'v': slice(6144, 9216)}
        """
        attr = module_name.rsplit(".", 1)[-1]
        if self.spec.fused and attr == self.spec.gate_up:
            rows = self.ffn(index).gate_up.out_features
            return {"gate": slice(0, rows // 2), "up": slice(rows // 2, rows)}
        a = self.attention_spec()
        if a.fused and attr == a.qkv:
            attn = getattr(self.layers[index], a.attn)
            rows = getattr(attn, a.qkv).out_features
            cfg = getattr(self.model, "config", None)
            cfg = getattr(cfg, "text_config", None) or cfg
            heads = getattr(cfg, "num_attention_heads", None)
            head_dim = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None)
            if heads is None or head_dim is None or (rows - heads * head_dim) % 2 or rows <= heads * head_dim:
                raise UnsupportedArchitectureError(
                    f"cannot split the fused {module_name} ({rows} rows) into q/k/v: "
                    f"num_attention_heads={heads}, head_dim={head_dim}; target the whole matrix (q, k and v)"
                )
            q = heads * head_dim
            kv = (rows - q) // 2
            return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, rows)}
        return None

    def parameter_names(self, index: int, roles: Sequence[str]) -> list[str]:
        """Qualified weight names, e.g. ``model.layers.3.mlp.up_proj.weight``."""
        return [f"{m}.weight" for m in self.module_names(index, roles)]


def _get_path(obj: object, path: str) -> nn.ModuleList:
    for part in path.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, nn.ModuleList):
        raise AttributeError(path)
    return obj


def _find_layers(model: nn.Module) -> str | None:
    for path in _LAYER_PATHS:
        try:
            layers = _get_path(model, path)
        except AttributeError:
            continue
        if len(layers) > 0:
            return path
    # Fallback: the longest ModuleList of identical blocks anywhere in the model.
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and (best is None or len(module) > best[0]):
                best = (len(module), name)
    return best[1] if best else None


def _first_attr(module: nn.Module, names: Sequence[str]) -> str | None:
    for n in names:
        if isinstance(getattr(module, n, None), nn.Module):
            return n
    return None


def _infer_spec(layer: nn.Module, where: str) -> FFNSpec:
    """Introspect one decoder layer for a gated FFN; explain what was found if there is none."""
    mlp_name = _first_attr(layer, _MLP_NAMES)
    if mlp_name is None:
        children = [n for n, _ in layer.named_children()]
        raise UnsupportedArchitectureError(
            f"found decoder layers at `{where}` but no FFN submodule in them "
            f"(looked for {list(_MLP_NAMES)}; the layer has {children}). "
            "Add an entry to layerselect.arch.FAMILIES for this model."
        )
    mlp = getattr(layer, mlp_name)
    gate, up = _first_attr(mlp, _GATE_NAMES), _first_attr(mlp, _UP_NAMES)
    down, act = _first_attr(mlp, _DOWN_NAMES), _first_attr(mlp, _ACT_NAMES)
    fused = _first_attr(mlp, ("gate_up_proj",))
    if fused and down and act:
        return FFNSpec(mlp=mlp_name, act=act, gate=None, up=None, down=down, gate_up=fused)
    if gate and up and down and act:
        return FFNSpec(mlp=mlp_name, act=act, gate=gate, up=up, down=down)
    children = [n for n, _ in mlp.named_children()]
    raise UnsupportedArchitectureError(
        f"the FFN `{where}.0.{mlp_name}` has submodules {children}: no gated FFN "
        "(layerselect needs down(f(gate(x)) * up(x)) with gate/up/down projections and an "
        "activation module). Models such as GPT-2 or BERT with a plain two-matrix MLP are not "
        "supported; for a gated FFN under other names, add an entry to layerselect.arch.FAMILIES."
    )


def _infer_attention(layer: nn.Module, where: str) -> AttnSpec:
    """Introspect one decoder layer for its attention projections (separate or fused qkv)."""
    attn_name = _first_attr(layer, _ATTN_NAMES)
    if attn_name is not None:
        attn = getattr(layer, attn_name)
        o = _first_attr(attn, _O_NAMES)
        q, k, v = _first_attr(attn, _Q_NAMES), _first_attr(attn, _K_NAMES), _first_attr(attn, _V_NAMES)
        qkv = _first_attr(attn, _QKV_NAMES)
        if o and q and k and v:
            return AttnSpec(attn=attn_name, q=q, k=k, v=v, o=o)
        if o and qkv:
            return AttnSpec(attn=attn_name, q=None, k=None, v=None, o=o, qkv=qkv)
        found = [n for n, _ in attn.named_children()]
    else:
        found = [n for n, _ in layer.named_children()]
    raise UnsupportedArchitectureError(
        f"could not find the attention projections in `{where}.0` (looked for an attention module "
        f"{list(_ATTN_NAMES)} with q/k/v/o or fused qkv projections; found {found}). "
        "Add an AttnSpec to this family's entry in layerselect.arch.FAMILIES."
    )


def get_layout(model: nn.Module) -> ModelLayout:
    """Return the :class:`ModelLayout` for a loaded transformers model (or our wrapper of one)."""
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    where = _find_layers(model)
    if where is None:
        raise UnsupportedArchitectureError(
            f"could not find the decoder layers of {type(model).__name__} "
            f"(model_type={model_type!r}); looked for {list(_LAYER_PATHS)} and for any list of "
            "identical blocks. Is this a decoder-only transformer?"
        )
    layers = _get_path(model, where)
    spec = FAMILIES.get(model_type)
    if spec is None or not hasattr(layers[0], spec.mlp):
        spec = _infer_spec(layers[0], where)
        family = f"{model_type} (inferred)"
    else:
        family = model_type
    return ModelLayout(model, family, spec, where)
