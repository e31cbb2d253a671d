"""keras_attn.layers.shapes: arguments, projection equations, folding of high-rank inputs.

The folds are checked against numpy written index by index: position ``(b, *dims)`` of
the input lands at batch row ``b * others + o`` and sequence position ``t``, with ``o``
and ``t`` the row-major indices of the other and the attention axes.
"""

import itertools
import re

import numpy as np
import pytest
from keras import ops

from keras_attn.layers import shapes

# -- arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,expected", [(None, None), (5, (5,)), ([2, 3], (2, 3)), ((4,), (4,))]
)
def test_output_shape_arg(value, expected):
    assert shapes.output_shape_arg(value) == expected


@pytest.mark.parametrize(
    "value,shown",
    [
        (-1, "(-1,)"),
        (True, "True"),
        ("5", "5"),
        (2.0, "2.0"),
        ((2, 0), "(2, 0)"),
        ([3, None], "[3, None]"),
        ((True,), "(True,)"),
    ],
)
def test_bad_output_shape_is_keras_error(value, shown):
    with pytest.raises(ValueError, match=rf"Invalid `output_shape`: {re.escape(shown)}\. When"):
        shapes.output_shape_arg(value)


@pytest.mark.parametrize("unset", [None, 0, (), []])
def test_unset_output_shape(unset):
    # Keras reads a falsy `output_shape` as unset: the query's feature size.
    assert shapes.output_shape_arg(unset) is None


@pytest.mark.parametrize(
    "value,expected", [(None, None), (2, (2,)), ([1, 2], (1, 2)), ((-1,), (-1,))]
)
def test_attention_axes_arg(value, expected):
    assert shapes.attention_axes_arg(value) == expected


def test_bad_attention_axes_is_keras_error():
    with pytest.raises(ValueError, match=r"must be an int, list, or tuple.*attention_axes=1.5"):
        shapes.attention_axes_arg(1.5)


@pytest.mark.parametrize(
    "axes,rank,expected",
    [
        (None, 3, (1,)),
        (None, 5, (1, 2, 3)),
        ((2,), 4, (2,)),
        ((-2,), 4, (2,)),
        ((-2, 1), 5, (1, 3)),  # sorted
    ],
)
def test_resolve_attention_axes(axes, rank, expected):
    assert shapes.resolve_attention_axes(axes, rank) == expected


@pytest.mark.parametrize("axes,rank", [((0,), 4), ((3,), 4), ((-1,), 4), ((5,), 4), ((1, -3), 4)])
def test_attention_axes_that_are_not_inner_axes_are_errors(axes, rank):
    with pytest.raises(
        ValueError,
        match=rf"distinct axes .*Received: attention_axes={re.escape(str(axes))} for inputs of rank {rank}",
    ):
        shapes.resolve_attention_axes(axes, rank)


@pytest.mark.parametrize("free,bound,out", [(2, 1, 2), (3, 1, 2), (3, 2, 1), (1, 1, 1)])
def test_projection_equation_contracts_the_bound_axes(free, bound, out):
    equation, bias_axes = shapes.projection_equation(free, bound, out)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4)[:free] + (5, 2)[:bound])
    kernel = rng.normal(size=(5, 2)[:bound] + (3, 4)[:out])
    expected = np.tensordot(x, kernel, axes=bound)  # the last `bound` axes of x
    np.testing.assert_allclose(np.einsum(equation, x, kernel), expected, rtol=1e-12)
    assert len(bias_axes) == out and equation.endswith(bias_axes)
    assert shapes.projection_equation(2, 1, 2) == ("abc,cde->abde", "de")


# -- folding -----------------------------------------------------------------------------


def ref_fold(heads, axes):
    """``(B, *dims, H, D)`` -> ``(B * others, T, H, D)``, element by element."""
    batch, *dims, h, d = heads.shape
    others = [a for a in range(1, len(dims) + 1) if a not in axes]
    n_other = int(np.prod([heads.shape[a] for a in others]))
    n_t = int(np.prod([heads.shape[a] for a in axes]))
    out = np.zeros((batch * n_other, n_t, h, d), heads.dtype)
    for index in itertools.product(*(range(n) for n in (batch, *dims))):
        o = np.ravel_multi_index([index[a] for a in others], [heads.shape[a] for a in others])
        t = np.ravel_multi_index([index[a] for a in axes], [heads.shape[a] for a in axes])
        out[index[0] * n_other + o, t] = heads[index]
    return out


# (input shape without the features, attention axes): rank 3, 4 and 5 inputs.
FOLDS = [((2, 5), (1,)), ((2, 3, 4), (2,)), ((2, 3, 4), (1,)), ((2, 3, 4, 2), (1, 3))]


@pytest.mark.parametrize("dims,axes", FOLDS)
def test_fold_and_unfold(dims, axes):
    rng = np.random.default_rng(1)
    heads = rng.normal(size=(*dims, 2, 3)).astype("float32")  # (B, *dims, H, D)
    folded = ops.convert_to_numpy(shapes.fold(heads, axes))
    np.testing.assert_array_equal(folded, ref_fold(heads, axes))
    # unfold is the inverse, for an output with another last dim.
    output = rng.normal(size=(*folded.shape[:-1], 5)).astype("float32")  # (B', T, H, Dv)
    unfolded = ops.convert_to_numpy(shapes.unfold(output, heads, axes))
    assert unfolded.shape == (*dims, 2, 5)
    np.testing.assert_array_equal(ref_fold(unfolded, axes), output)


@pytest.mark.parametrize("dims,axes", FOLDS)
def test_unfold_weights(dims, axes):
    rng = np.random.default_rng(2)
    q_heads = np.zeros((*dims, 2, 3), "float32")
    key_dims = tuple(n + 1 if a in axes else n for a, n in enumerate(dims))  # Tk != Tq
    k_heads = np.zeros((*key_dims, 2, 3), "float32")
    others = [a for a in range(1, len(dims)) if a not in axes]
    n_other = int(np.prod([dims[a] for a in others]))
    q_axes, k_axes = [dims[a] for a in axes], [key_dims[a] for a in axes]
    weights = rng.normal(size=(dims[0] * n_other, 2, np.prod(q_axes), np.prod(k_axes)))
    got = ops.convert_to_numpy(
        shapes.unfold_weights(weights.astype("float32"), q_heads, k_heads, axes)
    )
    # Keras's layout: (B, *others, H, *query_axes, *key_axes).
    assert got.shape == (dims[0], *[dims[a] for a in others], 2, *q_axes, *k_axes)
    for index in itertools.product(*(range(n) for n in got.shape)):
        b, rest = index[0], index[1:]
        o = np.ravel_multi_index(rest[: len(others)], [dims[a] for a in others])
        h = rest[len(others)]
        qi = np.ravel_multi_index(rest[len(others) + 1 : len(others) + 1 + len(axes)], q_axes)
        ki = np.ravel_multi_index(rest[len(others) + 1 + len(axes) :], k_axes)
        assert got[index] == np.float32(weights[b * n_other + o, h, qi, ki])


@pytest.mark.parametrize("per_head", [False, True])
def test_fold_mask_of_a_rank_4_input(per_head):
    # Input (B=2, 3, 4, F), attention over axis 2: scores (B, 3, H, 4, 5) in Keras.
    rng = np.random.default_rng(3)
    q_heads, k_heads = np.zeros((2, 3, 4, 2, 3), "float32"), np.zeros((2, 3, 5, 2, 3), "float32")
    if per_head:
        mask = rng.random((2, 3, 2, 4, 5)) > 0.5  # (B, others, H, Tq, Tk)
    else:
        mask = rng.random((2, 3, 4, 5)) > 0.5  # Keras expands it at the head axis
    got = ops.convert_to_numpy(shapes.fold_mask(mask, q_heads, k_heads, (2,)))
    heads = 2 if per_head else 1
    assert got.shape == (6, heads, 4, 5) and got.dtype == bool
    for b, o, h in itertools.product(range(2), range(3), range(heads)):
        expected = mask[b, o, h] if per_head else mask[b, o]
        np.testing.assert_array_equal(got[b * 3 + o, h], expected)


def test_fold_mask_broadcasts_and_flattens_two_attention_axes():
    # Input (B=2, 3, 2, F) attending over axes 1 and 2 (T = 6); a mask of
    # (query axes, key axes) only, broadcast over the batch.
    rng = np.random.default_rng(4)
    q_heads, k_heads = np.zeros((2, 3, 2, 2, 3), "float32"), np.zeros((2, 3, 2, 2, 3), "float32")
    mask = rng.random((3, 2, 3, 2)) > 0.5  # (q1, q2, k1, k2)
    got = ops.convert_to_numpy(shapes.fold_mask(mask, q_heads, k_heads, (1, 2)))
    assert got.shape == (2, 1, 6, 6)
    for b in range(2):
        np.testing.assert_array_equal(got[b, 0], mask.reshape(6, 6))
