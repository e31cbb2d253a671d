"""Native kernels: a backend's own exact kernel for an attention it can express.

These are kernels only: `keras_attn.dispatch.plan` decides when one runs (the
"native" path) and `keras_attn.dispatch.attend` calls it. Each computes exactly what
the dense path computes, or is not chosen.

- JAX: ``jax.nn.dot_product_attention`` with a sliding window
  (``local_window_size``), which runs cuDNN's flash kernel on an NVIDIA GPU
  (``implementation="cudnn"``; bfloat16/float16 inputs) and XLA elsewhere.
- PyTorch: FlexAttention (`torch.nn.attention.flex_attention`) for any pattern. Its
  ``BlockMask`` is built from the pattern's own ``block_mask`` (numpy, through
  `keras_attn.block_layout`, never from a dense Tq x Tk mask), and its ``mask_mod``
  evaluates the pattern's ``mask`` on FlexAttention's index tensors, with the call's
  data mask (padding, explicit masks) folded in.
"""

import functools

import keras
import numpy as np
from keras import ops

from keras_attn import block_layout
from keras_attn.patterns import Local
from keras_attn.positions import Positions

__all__ = [
    "FLEX_BLOCK_SIZE",
    "flex_attention",
    "flex_attention_is_fast",
    "flex_block_mask",
    "has_flex_attention",
    "jax_cudnn_available",
    "jax_local_attention",
    "jax_window",
]


def jax_window(pattern):
    """``(left, right)`` for ``local_window_size`` if `pattern` is exactly a sliding window.

    `keras_attn.patterns.Local(window)` lets query i see keys ``|i - j| < window``:
    ``(window - 1, window - 1)``, or ``(window - 1, 0)`` when causal. None for any
    other pattern (a subclass that overrides ``mask`` included).
    """
    if not isinstance(pattern, Local) or type(pattern).mask is not Local.mask:
        return None
    reach = pattern.window - 1
    return (reach, 0 if pattern.causal else reach)


def jax_cudnn_available(dtype):
    """Whether cuDNN's kernel can run here for inputs of `dtype` (a GPU, 16-bit inputs)."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    dtype = keras.backend.standardize_dtype(dtype)
    return jax.default_backend() == "gpu" and dtype in ("float16", "bfloat16")


def jax_local_attention(query, key, value, *, scale, window):
    """Sliding-window attention by ``jax.nn.dot_product_attention``.

    Args:
        query: ``(B, T, H, D)``; key ``(B, T, K, D)``; value ``(B, T, K, D)``, with
            ``H`` a multiple of ``K`` (grouped-query attention), queries and keys at
            the same positions (no cache offset, ``Tq == Tk``).
        scale: Factor of the logits.
        window: ``(left, right)``: query i sees keys ``i - left .. i + right``.

    Returns:
        ``(B, T, H, D)`` in the query's dtype. Every query sees at least itself, so
        no row is empty.
    """
    import jax

    # cuDNN's kernel on a GPU (where `jax_cudnn_available` let the plan choose this);
    # XLA elsewhere (tests on a CPU).
    implementation = "cudnn" if jax.default_backend() == "gpu" else None
    left, right = window
    return jax.nn.dot_product_attention(
        query,
        key,
        value,
        scale=scale,
        is_causal=right == 0,
        local_window_size=(left, right),
        implementation=implementation,
    ).astype(ops.convert_to_tensor(query).dtype)


# FlexAttention's own sparse block size (its kernels' tile).
FLEX_BLOCK_SIZE = 128


@functools.cache
def has_flex_attention():
    """Whether the backend is PyTorch with FlexAttention (torch >= 2.5)."""
    if keras.backend.backend() != "torch":
        return False
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def flex_attention_is_fast():
    """Whether FlexAttention runs as a compiled kernel with a backward pass here.

    True where a CUDA device is visible. On a CPU (torch 2.13), FlexAttention has no
    backward pass, and outside `torch.compile` it forms the whole score matrix.
    """
    if not has_flex_attention():
        return False
    import torch

    return torch.cuda.is_available()


@functools.cache
def _compiled_flex_attention():
    import torch
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=False)


def _data_mask_mod(mask):
    """``mask_mod`` terms reading a bool mask broadcastable to ``(B, H, Tq, Tk)``."""
    mask = ops.cast(mask, "bool")
    while len(mask.shape) < 4:
        mask = mask[None]
    sizes = tuple(mask.shape)

    def allowed(b, h, q_idx, kv_idx):
        index = [i if n > 1 else 0 for i, n in zip((b, h, q_idx, kv_idx), sizes, strict=True)]
        return mask[tuple(index)]

    return allowed


def flex_block_mask(pattern, query_length, key_length, query_offset=0, mask=None, device="cpu"):
    """FlexAttention's ``BlockMask`` for `pattern` (and a data mask) at these lengths.

    The blocks come from ``pattern.block_mask`` (cached by `keras_attn.block_layout`);
    within the kept blocks, the ``mask_mod`` evaluates ``pattern.mask`` on the absolute
    positions (queries start at `query_offset`) and the data mask, if any.

    Args:
        pattern: A `keras_attn.Pattern`.
        query_length, key_length, query_offset: Python ints.
        mask: Bool data mask broadcastable to ``(B, H, Tq, Tk)``, or None.
        device: Where the block tables go (the queries' device).
    """
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    layout = block_layout.block_layout(
        pattern, query_length, key_length, FLEX_BLOCK_SIZE, query_offset
    )
    blocks = layout.block_mask  # (nq, nk) numpy bool
    # Each row's kept key blocks first, in ascending order: FlexAttention reads the
    # first kv_num_blocks[row] entries of kv_indices[row].
    order = np.argsort(~blocks, axis=1, kind="stable").astype("int32")  # (nq, nk)
    counts = blocks.sum(axis=1).astype("int32")  # (nq,)
    data_allowed = None if mask is None else _data_mask_mod(mask)

    def mask_mod(b, h, q_idx, kv_idx):
        positions = Positions(query=q_idx + query_offset, key=kv_idx, head=h)
        allowed = pattern.mask(positions)
        if data_allowed is not None:
            allowed = torch.logical_and(allowed, data_allowed(b, h, q_idx, kv_idx))
        return allowed

    return BlockMask.from_kv_blocks(
        torch.from_numpy(counts)[None, None].to(device),  # (1, 1, nq)
        torch.from_numpy(order)[None, None].to(device),  # (1, 1, nq, nk)
        BLOCK_SIZE=FLEX_BLOCK_SIZE,
        mask_mod=mask_mod,
        seq_lengths=(int(query_length), int(key_length)),
    )


def flex_attention(query, key, value, pattern, *, scale, query_offset=0, mask=None):
    """FlexAttention on projected heads, with the BlockMask of `flex_block_mask`.

    Compiled on a GPU (FlexAttention's fused kernels); elsewhere FlexAttention's own
    eager implementation runs (forward only on a CPU, torch 2.13).

    Args:
        query: ``(B, Tq, H, D)``; key ``(B, Tk, H, D)``; value ``(B, Tk, H, Dv)``.
        pattern: The `keras_attn.Pattern`; query_offset: its first query's position.
        scale: The score's factor (``scaled_dot``: ``1 / sqrt(D)``).
        mask: Bool data mask broadcastable to ``(B, H, Tq, Tk)``, or None.

    Returns:
        ``(B, Tq, H, Dv)``; a query with no allowed key gets zeros.
    """
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    tq, tk = query.shape[1], key.shape[1]
    block_mask = flex_block_mask(pattern, tq, tk, query_offset, mask, device=query.device)
    kernel = _compiled_flex_attention() if query.device.type == "cuda" else eager_flex
    q = ops.transpose(query, (0, 2, 1, 3))  # (B, H, Tq, D)
    k = ops.transpose(key, (0, 2, 1, 3))  # (B, H, Tk, D)
    v = ops.transpose(value, (0, 2, 1, 3))  # (B, H, Tk, Dv)
    output = kernel(q, k, v, block_mask=block_mask, scale=float(scale))
    return ops.transpose(output, (0, 2, 1, 3))  # (B, Tq, H, Dv)
