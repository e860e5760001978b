"""PCA in torch gives the numbers the numpy version gave; numpy in -> numpy out, tensor in -> tensor out."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerselect.representations import last_token_states, project_2d
from tiny import tiny_model, tiny_texts, tiny_tokenizer

# A fixed input: x[i, j] = sin(7 i + 3 j) + j / 2, 8 points in 4-D.
FIXED = [[math.sin(7 * i + 3 * j) + 0.5 * j for j in range(4)] for i in range(8)]
# project_2d(FIXED) from the numpy implementation (np.linalg.svd, numpy 2.x), rounded to 12 digits.
NUMPY_PCA = [
    [0.552991904105, 0.337540503709], [-0.81714376863, 0.280758213089],
    [-1.715071711792, 0.096965938808], [-1.698835840231, -0.123374590393],
    [-0.776427376728, -0.271812759488], [0.598148391831, -0.27528797091],
    [1.748331469694, -0.132089741266], [2.108006931751, 0.08730040645],
]


def test_pca_matches_the_numpy_implementation():
    xy = project_2d(torch.tensor(FIXED, dtype=torch.float64))
    assert isinstance(xy, torch.Tensor) and xy.dtype == torch.float64
    torch.testing.assert_close(xy, torch.tensor(NUMPY_PCA, dtype=torch.float64), rtol=0, atol=1e-11)
    from_numpy = project_2d(np.array(FIXED))
    assert isinstance(from_numpy, np.ndarray)
    np.testing.assert_array_equal(from_numpy, xy.numpy())
    assert project_2d(FIXED).tolist() == xy.tolist()  # nested lists work too


def test_pca_of_one_feature_pads_the_second_axis_with_zeros():
    # Centred values -2.5, -1.5, .5, 3.5; the only axis is (+1): the largest loading is positive.
    xy = project_2d(torch.tensor([[0.0], [1.0], [3.0], [6.0]]))
    assert xy.tolist() == [[-2.5, 0.0], [-1.5, 0.0], [0.5, 0.0], [3.5, 0.0]]


def test_too_few_points_name_the_shape():
    from layerselect.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=r"shape \(2, 3\)"):
        project_2d(torch.zeros(2, 3))


def test_last_token_states_are_float64_tensors():
    states, langs = last_token_states(tiny_model("llama"), tiny_tokenizer(), tiny_texts(2), [1])
    assert isinstance(states[1], torch.Tensor) and states[1].dtype == torch.float64
    assert states[1].shape == (len(langs), 32)
