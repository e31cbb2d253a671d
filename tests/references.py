"""Reference computations written independently of keras_attn, in numpy, shared by tests."""

import numpy as np


def np_softmax_attention(q, k, v, allowed, scale):
    """Masked softmax attention in numpy; heads first: q (B, H, Tq, D), allowed (B, H, Tq, Tk).

    A row with no allowed key gets zero weights and a zero output.
    """
    logits = q @ np.swapaxes(k, -1, -2) * scale
    logits = np.where(allowed, logits, -np.inf)
    peak = np.max(logits, -1, keepdims=True)
    e = np.where(allowed, np.exp(logits - np.where(np.isfinite(peak), peak, 0)), 0.0)
    total = e.sum(-1, keepdims=True)
    weights = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    return weights @ v, weights
