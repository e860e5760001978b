"""Invariants of the msd selection (hypothesis): language order, neuron order, scale."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _selection_helpers import hand_stats
from layerselect.selection import select

GROUPS = ["en", "de", "fr", "sw"]


@st.composite
def raw_stats(draw):
    """counts[l][n][g] <= tokens[g]; the reference (en, column 0) fires on neuron 0 of every layer."""
    num_layers = draw(st.integers(2, 5))
    num_neurons = draw(st.integers(1, 6))
    num_groups = draw(st.integers(2, 4))
    tokens = draw(st.lists(st.integers(1, 20), min_size=num_groups, max_size=num_groups))
    counts = [
        [[draw(st.integers(0, tokens[g])) for g in range(num_groups)] for _ in range(num_neurons)]
        for _ in range(num_layers)
    ]
    for layer in counts:
        layer[0][0] = tokens[0]  # keeps the overlap with en defined (S_en never empty)
    return counts, tokens, GROUPS[:num_groups]


def _key(sel):
    return sel.layers, sel.details["K"], sel.details["peak_layer"], sel.details["fallback"]


SETTINGS = settings(max_examples=60, deadline=None)


@SETTINGS
@given(raw_stats(), st.randoms(use_true_random=False))
def test_permuting_languages_keeps_the_selection(raw, rnd):
    counts, tokens, groups = raw
    order = list(range(len(groups)))
    rnd.shuffle(order)
    base = select(hand_stats(counts, tokens, groups))
    permuted = hand_stats(
        [[[row[g] for g in order] for row in layer] for layer in counts],
        [tokens[g] for g in order],
        [groups[g] for g in order],
    )
    other = select(permuted)
    assert _key(other) == _key(base)
    assert other.threshold == base.threshold or abs(other.threshold - base.threshold) < 1e-15


@SETTINGS
@given(raw_stats(), st.randoms(use_true_random=False))
def test_permuting_neurons_keeps_the_selection(raw, rnd):
    counts, tokens, groups = raw
    shuffled = []
    for layer in counts:  # an independent permutation per layer
        rows = list(layer)
        rnd.shuffle(rows)
        shuffled.append(rows)
    assert _key(select(hand_stats(shuffled, tokens, groups))) == _key(select(hand_stats(counts, tokens, groups)))


@SETTINGS
@given(raw_stats(), st.integers(2, 10_000))
def test_scaling_counts_and_tokens_keeps_the_selection(raw, factor):
    counts, tokens, groups = raw
    scaled = (torch.tensor(counts) * factor).tolist()
    base = select(hand_stats(counts, tokens, groups))
    big = select(hand_stats(scaled, [t * factor for t in tokens], groups))
    assert _key(big) == _key(base)
    assert big.scores == base.scores  # p = c*k / (t*k) is the same float


@SETTINGS
@given(raw_stats())
def test_selection_is_never_empty_and_inside_k(raw):
    counts, tokens, groups = raw
    sel = select(hand_stats(counts, tokens, groups))
    k_set = sel.details["K"]
    assert sel.layers and set(sel.layers) <= set(k_set)
    assert all(layer < sel.details["peak_layer"] for layer in k_set) or k_set == [0]
    if not sel.details["fallback"]:
        assert all(sel.scores[layer] > sel.threshold for layer in sel.layers)
