"""Derived metrics against hand-derived numbers and slow loops; persistence; merge refusals."""

import json
import math

import pytest
import torch

from layerselect import ActivationStats
from layerselect.errors import FormatError, IncompatibleStatsError, InvalidInputError


def make_stats(counts, tokens, groups, layers=None, **meta):
    counts = torch.tensor(counts, dtype=torch.int64)
    num_layers = counts.shape[0]
    g = len(groups)
    # One sample per group whose fraction is consistent with the counts.
    tokens_t = torch.tensor(tokens, dtype=torch.int64)
    frac = (counts.double().mean(1) / tokens_t.double()).T.contiguous()  # [G, L]
    return ActivationStats(
        counts=counts,
        tokens=tokens_t,
        groups=groups,
        layers=layers if layers is not None else list(range(num_layers)),
        sample_fraction=frac,
        sample_tokens=tokens_t.clone(),
        sample_group=torch.arange(g),
        sample_index=torch.zeros(g, dtype=torch.int64),
        meta=meta,
    )


@pytest.fixture
def hand():
    # 2 layers x 4 neurons x 2 groups (en, de); 10 tokens each.
    # layer 0: en p = [.9, .6, .1, .0], de p = [.8, .2, .7, .0]
    # layer 1: en p = [.5, .5, .5, .5], de p = [.5, .5, .5, .5]
    counts = [
        [[9, 8], [6, 2], [1, 7], [0, 0]],
        [[5, 5], [5, 5], [5, 5], [5, 5]],
    ]
    return make_stats(counts, [10, 10], ["en", "de"])


def test_activation_ratio_by_hand(hand):
    r = hand.activation_ratio()
    # layer 0: en (0.9+0.6+0.1+0)/4 = 0.4 ; de (0.8+0.2+0.7+0)/4 = 0.425
    assert r[0].tolist() == pytest.approx([0.4, 0.425], abs=1e-15)
    assert r[1].tolist() == pytest.approx([0.5, 0.5], abs=1e-15)
    assert r.dtype == torch.float64
    # set@0.5: p > 0.5 -> en {0, 1} = 2/4, de {0, 2} = 2/4 ; layer 1: none (p = 0.5 is not > 0.5)
    assert hand.activation_ratio("set@0.5").tolist() == [[0.5, 0.5], [0.0, 0.0]]
    assert hand.activation_ratio("set", tau=0.15).tolist() == [[0.5, 0.75], [1.0, 1.0]]


def test_msd_by_hand(hand):
    # mean R = 0.4125; deviations +-0.0125; MSD = 0.0125**2 = 1.5625e-4
    assert hand.msd().tolist() == pytest.approx([1.5625e-4, 0.0], abs=1e-18)


def test_overlap_by_hand(hand):
    per_group, average = hand.overlap("en")
    # layer 0, tau 0.5: S_en = {0, 1}, S_de = {0, 2}; |∩| / |S_en| = 1/2
    assert per_group[0].tolist() == [1.0, 0.5]
    assert average[0].item() == 0.5
    # layer 1: S_en empty -> undefined (NaN), never a silent 0 or 1
    assert math.isnan(average[1].item())
    # Jaccard: |{0}| / |{0,1,2}| = 1/3
    assert hand.overlap("en", method="jaccard").per_group[0, 1].item() == pytest.approx(1 / 3)
    # tau = 0.05: S_en = {0,1,2}, S_de = {0,1,2}: full overlap
    assert hand.overlap("en", tau=0.05).average[0].item() == 1.0


def test_pearson_overlap_matches_numpy():
    import numpy as np

    torch.manual_seed(0)
    counts = torch.randint(0, 50, (3, 20, 4))
    stats = make_stats(counts.tolist(), [50, 50, 50, 50], ["en", "de", "fr", "sw"])
    per_group, average = stats.overlap("de", method="pearson")
    p = counts.double().numpy() / 50
    for layer in range(3):
        for g in range(4):
            expected = np.corrcoef(p[layer, :, g], p[layer, :, 1])[0, 1]
            assert per_group[layer, g].item() == pytest.approx(expected, abs=1e-12)
        assert average[layer].item() == pytest.approx(per_group[layer, [0, 2, 3]].mean().item(), abs=1e-15)


def test_metrics_match_slow_loops():
    torch.manual_seed(1)
    counts = torch.randint(0, 30, (5, 16, 3))
    tokens = [30, 45, 60]
    stats = make_stats(counts.tolist(), tokens, ["en", "ja", "bn"])
    r = stats.activation_ratio()
    msd = stats.msd()
    overlap = stats.overlap("en", tau=0.3)
    for layer in range(5):
        rs = []
        for g in range(3):
            ps = [counts[layer, n, g].item() / tokens[g] for n in range(16)]
            rs.append(sum(ps) / 16)
            assert r[layer, g].item() == pytest.approx(rs[-1], abs=1e-15)
        mean = sum(rs) / 3
        assert msd[layer].item() == pytest.approx(sum((x - mean) ** 2 for x in rs) / 3, abs=1e-16)
        s_ref = {n for n in range(16) if counts[layer, n, 0].item() / tokens[0] > 0.3}
        ov = []
        for g in (1, 2):
            s_g = {n for n in range(16) if counts[layer, n, g].item() / tokens[g] > 0.3}
            ov.append(len(s_g & s_ref) / len(s_ref))
        assert overlap.average[layer].item() == pytest.approx(sum(ov) / 2, abs=1e-15)


def test_bad_metric_arguments(hand):
    with pytest.raises(InvalidInputError, match="not in these stats"):
        hand.overlap("fr")
    with pytest.raises(InvalidInputError, match="unknown overlap method"):
        hand.overlap("en", method="cosine")
    with pytest.raises(InvalidInputError, match="variant"):
        hand.activation_ratio("median")
    one = make_stats([[[1]]], [2], ["en"])
    with pytest.raises(InvalidInputError, match="at least two groups"):
        one.overlap("en")


def test_format_table(hand):
    text = hand.format_table()
    assert "overlap(en)" in text.splitlines()[0]
    assert len(text.splitlines()) == 4
    assert "1.5625e-04" in text


def test_save_load_round_trip(tmp_path, hand):
    hand.meta["model_name"] = "tiny"
    hand.save(tmp_path / "s")
    back = ActivationStats.load(tmp_path / "s")
    assert back == hand
    assert back.meta["model_name"] == "tiny"
    meta = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert meta["format_version"] == 2 and meta["library_version"] and meta["checksum"]
    assert meta["groups"] == ["en", "de"]


def test_load_refuses_corrupt_and_foreign_files(tmp_path, hand):
    d = tmp_path / "s"
    hand.save(d)
    tensors = (d / "stats.safetensors").read_bytes()
    (d / "stats.safetensors").write_bytes(tensors[: len(tensors) // 2])
    with pytest.raises(FormatError, match="corrupt"):
        ActivationStats.load(d)
    hand.save(d)
    meta = json.loads((d / "stats.json").read_text())
    meta["format_version"] = 99
    (d / "stats.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="newer"):
        ActivationStats.load(d)
    (d / "stats.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        ActivationStats.load(d)
    with pytest.raises(FormatError, match="not an ActivationStats directory"):
        ActivationStats.load(tmp_path / "nothing")


def test_failed_save_keeps_previous_files(tmp_path, hand, monkeypatch):
    d = tmp_path / "s"
    hand.save(d)
    before = (d / "stats.safetensors").read_bytes()
    import layerselect.stats.files as mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mod, "write_json", boom)
    other = make_stats([[[1, 2]], [[3, 4]]], [5, 5], ["en", "de"])
    with pytest.raises(OSError):
        other.save(d)
    assert (d / "stats.safetensors").read_bytes() == before
    assert ActivationStats.load(d) == hand
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no scratch directory left


def test_merge_refuses_other_models(hand):
    other = make_stats([[[1, 2]] * 4] * 2, [5, 5], ["en", "de"], layers=[0, 2])
    with pytest.raises(IncompatibleStatsError, match="layers"):
        hand.merge(other)
    a = make_stats([[[1]]], [2], ["en"], model_name="a")
    b = make_stats([[[1]]], [2], ["en"], model_name="b")
    with pytest.raises(IncompatibleStatsError, match="model_name"):
        a + b
    c = make_stats([[[1], [2]]], [2], ["en"])
    with pytest.raises(IncompatibleStatsError, match="intermediate size"):
        a + c


def test_subset(hand):
    de = hand.subset(["de"])
    assert de.groups == ["de"]
    assert torch.equal(de.counts[:, :, 0], hand.counts[:, :, 1])
    assert de.sample_group.tolist() == [0]
