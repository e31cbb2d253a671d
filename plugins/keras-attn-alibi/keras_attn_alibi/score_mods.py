"""ALiBi: attention with linear biases (Press, Smith and Lewis, 2022).

Instead of position embeddings, each head h penalizes a key by its distance to the
query, ``logits[h, i, j] - m_h * |i - j|``, with a fixed slope ``m_h`` per head. The
bias depends only on the distance, so a model trained on short sequences runs on
longer ones.
"""

import math

from keras import ops

import keras_attn
from keras_attn import validation


def alibi_slopes(num_heads):
    """The per-head slopes of the ALiBi paper, as a list of floats.

    For n heads, n a power of two, the geometric sequence ``2 ** (-8 * i / n)``,
    i = 1 .. n (for 8 heads: 1/2, 1/4, ..., 1/256). Otherwise the slopes of the
    largest power of two ``p < n``, followed by every other slope of ``2p`` heads
    until there are n (the paper's reference implementation).
    """
    validation.positive_int(num_heads, "num_heads")

    def power_of_two(n):
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    if num_heads & (num_heads - 1) == 0:
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]


class Alibi(keras_attn.ScoreMod):
    """ALiBi linear distance bias, one slope per head.

    Adds ``-m_h * |i - j|`` (``causal=False``, for encoders) or ``-m_h * (i - j)``
    (``causal=True``, the paper's decoder form) to the logits of head h, query
    position i and key position j. The two agree on every key at or before the
    query; the causal form gives later keys a positive bias, so use it only with a
    causal pattern (``use_causal_mask=True`` or ``pattern="causal"``).

    The slopes are fixed (not learned); see `alibi_slopes`. Positions are absolute,
    so KV-cache decoding sees the same biases as the full sequence.

    Args:
        num_heads: Number of heads; set by the attention layer when None.
        causal: Use the signed decoder bias instead of the symmetric one.

    Example:

    ```python
    keras_attn.Attention(num_heads=8, score_mods=["alibi"], use_bias=False)
    ```
    """

    name = "alibi"

    def __init__(self, num_heads=None, causal=False, **kwargs):
        super().__init__(**kwargs)
        if num_heads is not None:
            alibi_slopes(num_heads)  # validates
        self.num_heads = num_heads
        self.causal = validation.boolean(causal, "causal")

    def build(self, logits_shape=None):
        if self.num_heads is None:
            raise ValueError(
                "alibi needs `num_heads`: pass it, or use the score_mod inside a "
                "keras_attn attention layer, which sets it."
            )

    def call(self, logits, positions=None):
        slopes = ops.convert_to_tensor(alibi_slopes(self.num_heads), dtype="float32")
        slope = ops.take(slopes, ops.cast(positions.head, "int32"))  # broadcastable
        distance = ops.cast(positions.query - positions.key, "float32")  # (..., Tq, Tk)
        if not self.causal:
            distance = ops.abs(distance)
        bias = -slope * distance
        return ops.cast(ops.cast(logits, "float32") + bias, logits.dtype)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "causal": self.causal}


@keras_attn.hookimpl
def register_score_mods(register):
    register(Alibi)
