"""Training with `jit_compile=True`: the loss falls and gradients reach the projections."""

import keras
import numpy as np
import pytest

import keras_attn

T, F = 6, 4


def pointer_task(n=96, seed=0):
    """Every position must output the input vector whose first feature is largest.

    Solved by attending to that one key, so a content-based attention layer learns it.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, T, F)).astype("float32")
    best = x[np.arange(n), np.argmax(x[:, :, 0], axis=1)]  # (n, F)
    y = np.repeat(best[:, None, :], T, axis=1)
    return x, y


def model_with(attention):
    inputs = keras.Input((T, F))
    h = keras.layers.Dense(8)(inputs)
    h = attention(h)
    outputs = keras.layers.Dense(F)(h)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize(
    "make, component",
    [
        (lambda: keras_attn.Attention(num_heads=2, name="attn"), None),
        (lambda: keras_attn.HardAttention(num_heads=2, name="attn"), None),
        (
            lambda: keras_attn.HardAttention(num_heads=2, gumbel=True, seed=1, name="attn"),
            None,
        ),
        (lambda: keras_attn.LocalAttention(window=3, num_heads=2, name="attn"), None),
        (lambda: keras_attn.Attention(num_heads=2, score="general", name="attn"), "score"),
    ],
    ids=["softmax", "hard", "hard_gumbel", "local", "general"],
)
def test_fit_with_jit_compile(make, component):
    keras.utils.set_random_seed(1)
    x, y = pointer_task()
    model = model_with(make())
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse", jit_compile=True)
    attention = model.get_layer("attn")
    before = {w.path: np.array(w) for w in attention.weights}

    history = model.fit(x, y, batch_size=32, epochs=8, verbose=0)

    losses = history.history["loss"]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.85 * losses[0], losses
    # Adam moves a weight only where its gradient was non-zero at some step.
    after = {w.path: np.array(w) for w in attention.weights}
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    for name in ("query/kernel", "key/kernel", "value/kernel", "attention_output/kernel"):
        assert any(path.endswith(name) for path in changed), (name, changed)
    if component is not None:
        assert getattr(attention, component).weights
        assert {w.path for w in getattr(attention, component).weights} <= changed
