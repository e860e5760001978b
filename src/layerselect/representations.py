"""Last-token hidden states of parallel texts, projected to 2-D (the paper's Fig. 10).

- :func:`last_token_states`: for each text (encoded alone, default special
  tokens, right padding) the hidden state of its last real token after the
  chosen decoder layers (layer ``l`` = the output of decoder layer ``l``,
  ``hidden_states[l + 1]`` in transformers; for the last layer that entry has
  the model's final norm applied);
- :func:`project_2d`: PCA (default, torch SVD in float64, deterministic signs) or
  t-SNE (needs scikit-learn, an optional extra);
- :func:`parallel_alignment`: the plot as numbers: how close each language's
  state is to its English translation's (centred cosine), and how often the
  nearest English state is the translation (top-1 retrieval);
- :func:`~layerselect.plots.plot_representations` draws base vs trained side by side.

Example:
    >>> from layerselect.representations import last_token_states, project_2d
    >>> states, langs = last_token_states(model, tok, {"en": en, "de": de}, layers=[0, 5])  # doctest: +SKIP
    >>> xy = project_2d(states[5])                                                       # doctest: +SKIP
    >>> xy.shape                                                                          # doctest: +SKIP
    (40, 2)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import InvalidInputError

__all__ = ["last_token_states", "project_2d", "parallel_alignment", "METHODS"]

#: Projection methods; ``"tsne"`` needs scikit-learn.
METHODS = ("pca", "tsne")


@torch.no_grad()
def last_token_states(
    model: Any,
    tokenizer: Any,
    texts: Mapping[str, Sequence[str]],
    layers: Sequence[int],
    *,
    batch_size: int = 8,
    precision: str = "fp32",
) -> tuple[dict[int, torch.Tensor], list[str]]:
    """Hidden state of each text's last real token after each of ``layers``.

    Returns ``({layer: float64 CPU tensor [n_texts, hidden]}, langs)`` with the rows
    in the order of ``texts`` (language by language) and ``langs[i]`` the
    language of row ``i``. Batching does not change the values beyond rounding
    (right padding, so real tokens never attend to pads). ``precision``: ``"fp32"``
    (default), ``"bf16"`` autocast or ``"auto"`` (:mod:`layerselect.precision`); the
    states come back in float64 either way.

    Example:
        >>> states, langs = last_token_states(model, tok, {"en": ["Hi."]}, [0])   # doctest: +SKIP
        >>> states[0].shape, langs                                                # doctest: +SKIP
        (torch.Size([1, 640]), ['en'])
    """
    from ._running import eval_mode, pad_batch, pad_token_id
    from .arch import get_layout, unwrap_model
    from .precision import autocast, model_dtype

    base = unwrap_model(model)
    n_layers = get_layout(base).num_layers
    layers = [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise InvalidInputError(f"layers {bad or layers} are out of range: the model has {n_layers} (0..{n_layers - 1})")
    flat = [(lang, t) for lang, items in texts.items() for t in items]
    if not flat:
        raise InvalidInputError("no texts to encode")
    device = next(base.parameters()).device
    pad = pad_token_id(tokenizer)
    rows: dict[int, list[torch.Tensor]] = {layer: [None] * len(flat) for layer in layers}  # type: ignore[list-item]
    with eval_mode(base), autocast(precision, device, model_dtype(base)):
        for s in range(0, len(flat), batch_size):
            enc = [tokenizer(t, add_special_tokens=True)["input_ids"] for _, t in flat[s : s + batch_size]]
            ids, mask = pad_batch(enc, pad, padding_side="right")
            hs = base(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True).hidden_states
            last = torch.tensor([len(e) - 1 for e in enc])
            for layer in layers:
                h = hs[layer + 1][torch.arange(len(enc)), last.to(hs[0].device)]
                for r in range(len(enc)):
                    rows[layer][s + r] = h[r].double().cpu()
    out = {layer: torch.stack(rows[layer]) for layer in layers}
    return out, [lang for lang, _ in flat]


def project_2d(x: Any, method: str = "pca", seed: int = 0) -> Any:
    """Project rows of ``x`` to 2-D: PCA (centred SVD, each axis signed so its largest loading is positive) or t-SNE.

    ``x`` is a tensor or anything ``torch.as_tensor`` takes; the result is a float64
    ``[n, 2]`` tensor, or a numpy array when ``x`` was one (numpy in, numpy out).

    Example:
        >>> import torch
        >>> xy = project_2d(torch.tensor([[0., 0, 0], [2, 0, 0], [0, 1, 0], [2, 1, 0]]))
        >>> xy.abs().tolist()
        [[1.0, 0.5], [1.0, 0.5], [1.0, 0.5], [1.0, 0.5]]
    """
    as_numpy = type(x).__module__ == "numpy"  # give numpy callers numpy back, without importing it
    t = torch.as_tensor(x, dtype=torch.float64)
    if t.dim() != 2 or t.shape[0] < 3:
        shape = tuple(t.shape)
        raise InvalidInputError(f"need at least 3 points to project, got an array of shape {shape}")
    if method == "pca":
        xy = _pca_2d(t)
        return xy.numpy() if as_numpy else xy
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError as exc:
            raise InvalidInputError(
                "method='tsne' needs scikit-learn (pip install 'layerselect[tsne]'); use method='pca'"
            ) from exc
        perplexity = float(min(30.0, max(2.0, (t.shape[0] - 1) / 3)))
        xy = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(t.numpy())
        return xy if as_numpy else torch.as_tensor(xy, dtype=torch.float64)
    raise InvalidInputError(f"unknown projection method {method!r}; use one of {list(METHODS)}")


def parallel_alignment(
    states: torch.Tensor, langs: Sequence[str], reference: str = "en"
) -> dict[str, dict[str, float]]:
    """How close each language's states are to those of their ``reference`` translations.

    ``states``: ``[n_texts, hidden]`` rows of *line-aligned* parallel texts, as one
    layer of :func:`last_token_states` returns them; ``langs[i]``: the language of
    row ``i`` (every language the same number of rows, the ``k``-th row of each
    language being translations of one another). The rows are centred by their
    mean over all languages first: raw LLM states share a few huge dimensions
    that make every cosine close to 1. Returns, per non-reference language:

    - ``cosine``: mean cosine between a row and its translation's row;
    - ``retrieval``: fraction of rows whose most similar reference row (cosine)
      is their translation (chance: 1 / rows per language).

    plus ``"avg"``, the mean of both over the non-reference languages. float64.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1., 0], [0, 1], [1, 0.1], [0.1, 1]])
        >>> a = parallel_alignment(x, ["en", "en", "de", "de"])
        >>> a["de"]["retrieval"], round(a["de"]["cosine"], 4)
        (1.0, 0.9944)
    """
    x = torch.as_tensor(states, dtype=torch.float64)
    langs = list(langs)
    if x.dim() != 2 or x.shape[0] != len(langs):
        raise InvalidInputError(f"states of shape {tuple(x.shape)} do not match {len(langs)} language labels")
    order = list(dict.fromkeys(langs))
    rows = {lang: [i for i, g in enumerate(langs) if g == lang] for lang in order}
    if reference not in rows:
        raise InvalidInputError(f"the reference language {reference!r} is not among {order}")
    counts = {lang: len(r) for lang, r in rows.items()}
    if len(set(counts.values())) != 1:
        raise InvalidInputError(f"parallel texts need the same number of rows per language, got {counts}")
    if len(order) < 2:
        raise InvalidInputError("need at least one language besides the reference")
    unit = torch.nn.functional.normalize(x - x.mean(dim=0), dim=1)
    ref = unit[rows[reference]]
    out: dict[str, dict[str, float]] = {}
    for lang in order:
        if lang == reference:
            continue
        sim = unit[rows[lang]] @ ref.T  # [k, k]: row k against every reference row
        hits = sim.argmax(dim=1) == torch.arange(sim.shape[0])
        out[lang] = {"cosine": float(sim.diagonal().mean()), "retrieval": float(hits.double().mean())}
    out["avg"] = {key: sum(v[key] for v in out.values()) / len(out) for key in ("cosine", "retrieval")}
    return out


def _pca_2d(x: torch.Tensor) -> torch.Tensor:
    """The first two principal coordinates of the rows of ``x`` (zeros for a missing second axis)."""
    centred = x - x.mean(dim=0)
    _, _, vt = torch.linalg.svd(centred, full_matrices=False)
    comps = vt[:2]
    signs = torch.sign(comps[torch.arange(comps.shape[0]), comps.abs().argmax(dim=1)])
    xy = centred @ (comps * signs[:, None]).T
    return torch.nn.functional.pad(xy, (0, 2 - xy.shape[1]))
