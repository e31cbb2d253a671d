"""The entmax-1.5 normalizer (Peters, Niculae and Martins, 2019), in keras.ops.

entmax-1.5 sits between softmax and sparsemax: like sparsemax it gives exactly zero
weight to low-scoring keys, like softmax it is smooth where it is non-zero:

    entmax15(z)_j = max(z_j / 2 - tau, 0) ** 2,   tau such that the weights sum to 1.

`tau` is found exactly by sorting (Algorithm 2 of the paper), not by bisection.
"""

from keras import ops

import keras_attn


def entmax15(logits, axis=-1):
    """entmax-1.5 of `logits` along `axis` (float32 in, float32 out).

    Sort-based and exact: with the logits sorted in decreasing order, the support
    is the longest prefix of size k whose threshold
    ``tau_k = mean_k - sqrt((1 - k * var_k) / k)`` lies below its k-th value, where
    ``mean_k`` and ``var_k`` are the mean and variance of the first k halved logits.

    Args:
        logits: Float tensor.
        axis: The axis that sums to one.
    """
    logits = ops.convert_to_tensor(logits)  # numpy in: `/` below stays numpy otherwise
    if axis != -1:
        logits = ops.moveaxis(logits, axis, -1)
    x = logits / 2
    x = x - ops.max(x, axis=-1, keepdims=True)  # the largest is 0: no overflow below
    # tau >= -1 (the largest entry alone would weigh (0 - tau)**2 > 1 otherwise), so
    # entries below -1 are never in the support. Clamping them keeps the cumulative
    # sums small, so masked keys (-1e9) cost no float32 precision on long rows.
    x = ops.maximum(x, -2.0)
    x_sorted = ops.flip(ops.sort(x, axis=-1), axis=-1)  # decreasing
    length = ops.shape(x)[-1]
    rho = ops.cast(ops.arange(1, length + 1), x.dtype)  # (Tk,)
    mean = ops.cumsum(x_sorted, axis=-1) / rho
    mean_sq = ops.cumsum(ops.square(x_sorted), axis=-1) / rho
    delta = (1 - rho * (mean_sq - ops.square(mean))) / rho
    # sqrt's gradient is infinite at 0: take it only where delta > 0.
    positive = delta > 0
    root = ops.where(positive, ops.sqrt(ops.where(positive, delta, 1.0)), 0.0)
    tau = mean - root  # (..., Tk): the threshold if the support had k elements
    support = ops.sum(ops.cast(tau <= x_sorted, "int32"), axis=-1, keepdims=True)
    tau_star = ops.take_along_axis(tau, support - 1, axis=-1)  # (..., 1)
    weights = ops.square(ops.maximum(x - tau_star, 0.0))
    if axis != -1:
        weights = ops.moveaxis(weights, -1, axis)
    return weights


class Entmax15(keras_attn.Normalizer):
    """entmax-1.5 attention weights: sparse like sparsemax, smooth like softmax.

    Rows sum to one over the allowed keys; keys scoring far below the best get
    exactly zero weight. Masked-out keys get zero and a row with no allowed key
    all zeros (the `keras_attn.Normalizer` base class sees to both); the
    computation runs in float32 whatever the layer's dtype.

    Example:

    ```python
    layer = keras_attn.Attention(num_heads=4, normalizer="entmax15")
    ```
    """

    name = "entmax15"

    def normalize(self, logits, mask, training):
        return entmax15(logits, axis=-1)


@keras_attn.hookimpl
def register_normalizers(register):
    register(Entmax15)
