"""Score modifiers: adjust logits by position before they are normalized.

A score_mod is called as ``mod(logits, positions=positions)`` with logits of shape
``(..., Tq, Tk)`` and `keras_attn.positions.Positions` broadcastable to them, and
returns logits of the same shape.
"""

import math

import keras
from keras import ops

from keras_attn import validation
from keras_attn.components import ScoreMod
from keras_attn.components import builtin
from keras_attn.hookspecs import hookimpl


@builtin("score_mod")
class Softcap(ScoreMod):
    """Soft-caps logits to ``(-cap, cap)``: ``cap * tanh(logits / cap)`` (Gemma 2).

    Args:
        cap: Positive float bound.
    """

    name = "softcap"

    def __init__(self, cap=50.0, **kwargs):
        super().__init__(**kwargs)
        self.cap = validation.positive_number(cap, "cap")

    def call(self, logits, positions=None):
        x = ops.cast(logits, "float32")
        return ops.cast(self.cap * ops.tanh(x / self.cap), logits.dtype)

    def get_config(self):
        return {**super().get_config(), "cap": self.cap}


def relative_position_bucket(relative, num_buckets, max_distance, bidirectional):
    """Bucket ``key - query`` distances: exact when small, logarithmic when large.

    The scheme of T5 (Raffel et al., 2020): half the buckets hold exact distances,
    the other half log-spaced ones up to `max_distance`, beyond which distances
    share the last bucket. With `bidirectional`, keys before and after the query
    use separate halves of the buckets.
    """
    relative = ops.cast(relative, "int32")
    bucket = ops.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = ops.where(relative > 0, num_buckets, 0)
        distance = ops.abs(relative)
    else:
        distance = ops.maximum(-relative, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # Clamp before the log so that distance 0 gives no -inf (it is "small" anyway).
    far = ops.cast(ops.maximum(distance, max_exact), "float32")
    log_bucket = max_exact + ops.cast(
        ops.log(far / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact),
        "int32",
    )
    log_bucket = ops.minimum(log_bucket, num_buckets - 1)
    return bucket + ops.where(is_small, distance, log_bucket)


@builtin("score_mod")
class RelativePosition(ScoreMod):
    """Learned, bucketed relative-position bias, one scalar per (bucket, head) (T5).

    Args:
        num_buckets: Number of distance buckets.
        max_distance: Distances beyond this share the last bucket.
        bidirectional: Separate buckets for keys before and after the query. Use
            ``False`` for causal attention.
        num_heads: Number of heads; set by the attention layer if ``None``.
        embeddings_initializer: Initializer of the bias table.
    """

    name = "relative_position"

    def __init__(
        self,
        num_buckets=32,
        max_distance=128,
        bidirectional=True,
        num_heads=None,
        embeddings_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        bidirectional = validation.boolean(bidirectional, "bidirectional")
        min_buckets = 4 if bidirectional else 2
        if (
            not isinstance(num_buckets, int)
            or isinstance(num_buckets, bool)
            or num_buckets < min_buckets
        ):
            raise ValueError(
                f"`num_buckets` must be an integer >= {min_buckets} (bidirectional="
                f"{bidirectional}). Received: num_buckets={num_buckets}"
            )
        min_distance = num_buckets // (4 if bidirectional else 2)
        if (
            not isinstance(max_distance, int)
            or isinstance(max_distance, bool)
            or max_distance <= min_distance
        ):
            raise ValueError(
                f"`max_distance` must be an integer > {min_distance} for "
                f"num_buckets={num_buckets}. Received: max_distance={max_distance}"
            )
        validation.positive_int(num_heads, "num_heads", allow_none=True)
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.num_heads = num_heads
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

    def build(self, logits_shape=None):
        if self.num_heads is None:
            raise ValueError(
                "relative_position needs `num_heads`: pass it, or use the score_mod "
                "inside a keras_attn attention layer, which sets it."
            )
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.num_buckets, self.num_heads),
            initializer=self.embeddings_initializer,
            # Read in float32 under mixed precision, so that the gradient of each entry,
            # a sum over every (query, key) pair of its bucket, is summed in float32.
            autocast=False,
        )

    def call(self, logits, positions=None):
        bucket = relative_position_bucket(
            positions.key - positions.query,
            self.num_buckets,
            self.max_distance,
            self.bidirectional,
        )
        # One gather from the flattened table picks bias[bucket, head].
        index = bucket * self.num_heads + ops.cast(positions.head, "int32")
        table = ops.cast(ops.reshape(self.embeddings, (-1,)), "float32")
        bias = ops.take(table, index)  # the cast below, not the table, is in low precision
        return logits + ops.cast(bias, logits.dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "num_buckets": self.num_buckets,
            "max_distance": self.max_distance,
            "bidirectional": self.bidirectional,
            "num_heads": self.num_heads,
            "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
        }


@hookimpl
def register_score_mods(register):
    for cls in (Softcap, RelativePosition):
        register(cls)
