"""The benchmark's sizes and the useful work of each case, shared by run.py and report.py."""

HEADS, KEY_DIM, WINDOW = 8, 64, 256
WIDTH = HEADS * KEY_DIM
DENSE_SIZES = (256, 512, 1024, 2048, 4096)
LOCAL_SIZES = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
LOCAL_GLOBAL_SIZES = (8192, 65536)
# Peak memory of keras.layers.MultiHeadAttention forward+backward, in bytes per
# element of one (H, T, T) score tensor (measured: about 9 GB at T=8192), plus a base.
KERAS_BYTES_PER_SCORE = 4.5 * 4
BASE_BYTES = 1.5e9


# -- useful work ----------------------------------------------------------------------


def allowed_pairs(case, length, window=WINDOW):
    """Number of (query, key) pairs the case's pattern allows, per head."""
    t = length
    if case == "dense":  # causal
        return t * (t + 1) // 2
    rows = [min(i + window, t) - max(i - window + 1, 0) for i in range(t)]
    pairs = sum(rows)
    if case == "local_global":
        # Query 0 sees every key; key 0 is seen by every query outside its window.
        pairs += (t - rows[0]) + max(t - window, 0)
    return pairs


def useful_flops(case, length, projections=True):
    """Floating-point operations of forward+backward that the pattern needs.

    Attention: ``2 * D`` for q.k and ``2 * Dv`` for the weighted sum per allowed pair
    and head; projections: four ``(T, 512) x (512, 512)`` matmuls. The backward
    pass costs twice the forward one.
    """
    forward = allowed_pairs(case, length) * HEADS * 4 * KEY_DIM
    if projections:
        forward += 4 * 2 * length * WIDTH * WIDTH
    return 3 * forward
