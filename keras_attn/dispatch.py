"""Decide once, run once: the path an attention takes, and running it.

`plan` looks at the components, the lengths and the call's options and decides how
the attention runs (and, for the block-sparse path, which blocks it computes);
`attend` runs that plan. Layers call these two and nothing else of the engine, and
the kernels below never decide anything (as FlexAttention builds its ``BlockMask``
once and hands it to the kernel). The paths, all exact and all agreeing:

- ``native``: the backend's own exact kernel for this pattern (`keras_attn.native`:
  cuDNN's sliding-window flash kernel through ``jax.nn.dot_product_attention`` on a
  GPU; PyTorch's FlexAttention with a BlockMask from the pattern's ``block_mask``
  where CUDA is visible; Splash attention with a mask made from the pattern on a
  TPU), named in the plan's ``kernel``;
- ``fused``: `keras.ops.dot_product_attention` (`keras_attn.kernels.fused_attention`;
  flash kernels on GPU/TPU where the backend has them) when a fused kernel computes
  exactly these components (`Components.fused_scale`);
- ``block_sparse``: only the score blocks the pattern can reach
  (`keras_attn.block_sparse`, on a `keras_attn.block_layout.BlockLayout`);
- ``dense``: the exact masked reference (`keras_attn.kernels.dense_attention`).
"""

import logging
import warnings
from typing import NamedTuple

import numpy as np
from keras import ops

from keras_attn import block_layout as block_layout_module
from keras_attn import kernels
from keras_attn import native
from keras_attn import pallas
from keras_attn.block_sparse import block_sparse_attention
from keras_attn.masks import combine_masks
from keras_attn.positions import make_positions
from keras_attn.segments import segment_mask

logger = logging.getLogger("keras_attn")

__all__ = ["PATHS", "Plan", "attend", "block_sparse_pays_off", "plan"]

PATHS = ("native", "fused", "block_sparse", "dense")

# The auto mode takes the block-sparse path when it computes at most this fraction of
# the blocks of the dense score matrix...
MAX_COMPUTED_FRACTION = 0.5
# ...and the score matrix has at least this many blocks (gathers cost more than they
# save on small inputs).
MIN_BLOCKS = 16
# Where the fused kernel would run but computes every score (on a CPU), the auto mode
# takes the block-sparse path when it computes at most this fraction of the blocks:
# a causal pattern computes 0.625-0.67 of them from 8 x 8 blocks on (T >= 1024 with
# blocks of 128), and was then faster than the fused kernel on both TensorFlow and JAX.
MAX_FRACTION_OVER_FUSED = 0.7


class Plan(NamedTuple):
    """How one attention call runs, decided by `plan` and carried out by `attend`.

    Attributes:
        path: One of `PATHS`.
        components: The `keras_attn.components.Components` of the call.
        query_offset: Absolute position of the first query (int or scalar tensor).
        layout: The `keras_attn.block_layout.BlockLayout` (block-sparse path), or None.
        scale: The fused or native kernel's scale, or None.
        flash_attention: Passed to the fused kernel.
        kernel: The native kernel's name (``"jax_cudnn"``, ``"jax_splash"``,
            ``"torch_flex_attention"``), or None.
        window: The native kernel's ``(left, right)`` sliding window, or None.
        segment_layout: With segment ids on the block-sparse path, the
            `keras_attn.block_layout.SegmentLayout` that skips the blocks whose
            segments never meet; None otherwise.
    """

    path: str
    components: object
    query_offset: object = 0
    layout: object = None
    scale: object = None
    flash_attention: object = None
    kernel: object = None
    window: object = None
    segment_layout: object = None


def _static_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_empty(*lengths):
    return any(_static_int(n) and n == 0 for n in lengths)


def block_sparse_pays_off(
    pattern,
    query_length,
    key_length,
    mode="auto",
    block_size=128,
    query_offset=0,
    max_fraction=MAX_COMPUTED_FRACTION,
):
    """Whether the block-sparse path should run this pattern at these lengths.

    Args:
        mode: ``"auto"``: when it computes at most `max_fraction` of the blocks, the
            score matrix has at least `MIN_BLOCKS` blocks and the lengths and query
            offset are known Python ints. ``True``: always (raises if the lengths or
            offset are not static). ``False``: never.

    Raises:
        ValueError: ``mode=True`` with lengths or an offset known only at run time.
    """
    if mode is False:
        return False
    static = _static_int(query_length) and _static_int(key_length) and _static_int(query_offset)
    if mode is True:
        if not static:
            raise ValueError(
                "block_sparse=True needs query and key lengths and a query offset known "
                "when the function is traced (Python ints), because the blocks to "
                f"compute are worked out ahead of time. Received: query_length={query_length}, "
                f"key_length={key_length}, query_offset={query_offset!r}"
            )
        return True
    if not static or pattern.kernel_form == "full":
        return False
    nq = block_layout_module.num_blocks(query_length, block_size)
    nk = block_layout_module.num_blocks(key_length, block_size)
    if nq * nk < MIN_BLOCKS:
        return False
    layout = block_layout_module.block_layout(
        pattern, query_length, key_length, block_size, query_offset
    )
    return layout.computed_fraction <= max_fraction


def choose_path(components, **options):
    """The path that runs this attention: one of `PATHS` (``plan(...).path``; same arguments)."""
    return plan(components, **options).path


def plan(
    components,
    *,
    query_length,
    key_length,
    head_dim,
    value_dim=None,
    return_weights=False,
    training=None,
    block_sparse="auto",
    block_size=128,
    query_offset=0,
    flash_attention=None,
    name=None,
    dtype=None,
    has_mask=False,
    segment_ids=None,
    max_segment_length=None,
):
    """Decide how this attention runs.

    ``block_sparse=True`` insists on the block-sparse path, even where the fused one
    would do; ``False`` never takes it. With ``"auto"``, a fusable sparse pattern
    (causal) still takes the block-sparse path on a CPU, where the fused kernel
    computes the whole score matrix, once it skips enough blocks
    (`MAX_FRACTION_OVER_FUSED`), unless ``flash_attention`` is True.

    Args:
        components: `keras_attn.components.Components`, with the call's pattern.
        query_length, key_length: Tq and Tk (Python ints, or None/tensors when
            known only at run time, which rules out the block-sparse path).
        head_dim: D of queries and keys; value_dim: Dv (defaults to D).
        return_weights: Whether the caller needs the weights.
        training: Whether dropout is active.
        block_sparse, block_size, flash_attention: The layer's settings.
        query_offset: Absolute position of the first query (the cache index).
        name: The caller's name (the layer's), for the warning below.
        dtype: The heads' dtype (the native kernels need 16-bit inputs), or None.
        has_mask: Whether a data mask (padding, explicit, cache) comes with the call.
        segment_ids: ``(query_ids (B, Tq), key_ids (B, Tk))`` of packed sequences, or
            None. On the block-sparse path they narrow the layout per batch row
            (`keras_attn.block_layout.segment_layout`); `attend` then takes them
            instead of a segment mask.
        max_segment_length: The layer's bound on segment lengths (tokens), or None.

    With segment ids and ``block_sparse="auto"``, the block-sparse path is also taken
    for full and causal patterns (where no fused kernel would skip work: off a CPU the
    fused flash kernel is kept) once the blocks whose segments meet are at most
    `MAX_COMPUTED_FRACTION` (`MAX_FRACTION_OVER_FUSED` against a CPU's fused kernel) of
    the score matrix: measured on concrete ids, bounded by `max_segment_length` on
    traced ones.

    On a TPU, scaled_dot + softmax without score_mods, dropout or weights runs
    natively on Splash attention for any pattern (``kernel="jax_splash"``), with
    lengths and query offset known when traced and no data mask.

    A sliding window (`keras_attn.patterns.Local`) with scaled_dot + softmax runs
    natively, on cuDNN's own sliding-window kernel, where JAX sees an NVIDIA GPU and
    the inputs are 16-bit, with no data mask, no cache offset and ``Tq == Tk``.

    Where ``block_sparse="auto"`` would consider the block-sparse path for this
    pattern but the lengths are unknown when the function is traced (TensorFlow
    retraces ``model.fit``/``predict`` with a length of None once it sees a second
    length), the plan falls back to whole ``Tq x Tk`` scores and warns once per
    `name` (`warn_unknown_lengths`), never silently.

    Returns:
        A `Plan`.
    """
    value_dim = head_dim if value_dim is None else value_dim
    # keras.ops.dot_product_attention needs one head size for keys and values (the
    # JAX backend checks it), so value_dim != head_dim rules out the fused path.
    scale = components.fused_scale(
        head_dim,
        return_weights=return_weights or value_dim != head_dim,
        dropout_active=components.dropout_active(training),
    )
    pattern = components.pattern

    def sparse(**kwargs):
        return block_sparse_pays_off(
            pattern, query_length, key_length, block_size=block_size,
            query_offset=query_offset, **kwargs,
        )  # fmt: skip

    def block_sparse_plan():
        if _is_empty(query_length, key_length):
            # No block to compute: `attend` returns zeros without a layout.
            return Plan("block_sparse", components, query_offset)
        layout = block_layout_module.block_layout(
            pattern, query_length, key_length, block_size, query_offset
        )
        segment_layout = None
        if segment_ids is not None:
            segment_layout = block_layout_module.segment_layout(
                layout, *segment_ids, max_segment_length=max_segment_length,
                aligned=segment_ids[0] is segment_ids[1] and query_offset == 0,
            )  # fmt: skip
        return Plan(
            "block_sparse", components, query_offset, layout=layout,
            segment_layout=segment_layout,
        )  # fmt: skip

    cpu_fused = (
        block_sparse == "auto" and flash_attention is not True and kernels.fused_kernel_is_dense()
    )
    # Full and causal patterns run as Keras's own layer does (fused, or the whole
    # matrix on a CPU): no warning. A sparse pattern on whole matrices is quadratic.
    if (
        block_sparse == "auto"
        and pattern.kernel_form is None
        and not (_static_int(query_length) and _static_int(key_length))
    ):
        warn_unknown_lengths(name, pattern, query_length, key_length)
    native_plan = _native_plan(
        components, head_dim=head_dim, value_dim=value_dim, return_weights=return_weights,
        training=training, query_length=query_length, key_length=key_length,
        query_offset=query_offset, block_sparse=block_sparse, has_mask=has_mask, dtype=dtype,
        flash_attention=flash_attention,
    )  # fmt: skip
    if native_plan is not None:
        return native_plan
    if segment_ids is not None and block_sparse == "auto" and (scale is None or cpu_fused):
        # Packed rows: the blocks whose segments never meet are skipped, so even a full
        # or causal pattern may pay off on the block-sparse path (where the ids are
        # concrete, or `max_segment_length` bounds them).
        packed_plan = _packed_plan_if_it_pays_off(
            block_sparse_plan, query_length, key_length, query_offset, block_size,
            MAX_COMPUTED_FRACTION if scale is None else MAX_FRACTION_OVER_FUSED,
        )  # fmt: skip
        if packed_plan is not None:
            return packed_plan
    if scale is not None and block_sparse is not True:
        if cpu_fused and sparse(mode="auto", max_fraction=MAX_FRACTION_OVER_FUSED):
            return block_sparse_plan()
        return Plan("fused", components, query_offset, scale=scale, flash_attention=flash_attention)
    if sparse(mode=block_sparse):
        return block_sparse_plan()
    return Plan("dense", components, query_offset)


def _packed_plan_if_it_pays_off(block_sparse_plan, query_length, key_length, query_offset,
                                block_size, max_fraction):  # fmt: skip
    """The block-sparse plan with segment ids where it computes at most `max_fraction`."""
    if not all(_static_int(n) for n in (query_length, key_length, query_offset)) or _is_empty(
        query_length, key_length
    ):
        return None
    nq = block_layout_module.num_blocks(query_length, block_size)
    nk = block_layout_module.num_blocks(key_length, block_size)
    if nq * nk < MIN_BLOCKS:
        return None
    candidate = block_sparse_plan()
    if candidate.segment_layout is not None and (
        candidate.segment_layout.computed_fraction <= max_fraction
    ):
        return candidate
    return None


def _native_plan(components, *, head_dim, value_dim, return_weights, training, query_length,
                 key_length, query_offset, block_sparse, has_mask, dtype,
                 flash_attention):  # fmt: skip
    """The native path's plan if a backend kernel computes exactly this, else None."""
    scale = components.softmax_scale(
        head_dim,
        return_weights=return_weights or value_dim != head_dim,
        dropout_active=components.dropout_active(training),
    )
    offset = query_offset
    if (
        scale is not None
        and block_sparse is not True
        and flash_attention is not False
        and components.pattern.kernel_form is None  # full and causal: the fused path
        and all(_static_int(n) for n in (query_length, key_length, offset))
        and native.flex_attention_is_fast()
    ):
        return Plan("native", components, offset, scale=scale, kernel="torch_flex_attention")
    if (
        scale is not None
        and block_sparse is not True
        and flash_attention is not False
        and not has_mask  # whole-key/query masks are expressible, but plan sees no shape
        and all(_static_int(n) for n in (query_length, key_length, offset))
        and native.splash_attention_available(dtype)
    ):
        return Plan("native", components, offset, scale=scale, kernel="jax_splash")
    window = native.jax_window(components.pattern)
    if (
        scale is None
        or window is None
        or block_sparse is True
        or has_mask
        or not (_static_int(offset) and offset == 0)
        or not (_static_int(query_length) and query_length == key_length)
        or dtype is None
        or not native.jax_cudnn_available(dtype)
    ):
        return None
    return Plan("native", components, offset, scale=scale, kernel="jax_cudnn", window=window)


_warned_unknown_lengths = set()


def warn_unknown_lengths(name, pattern, query_length, key_length):
    """Warn, once per `name`, that a sparse pattern runs on whole score matrices."""
    if name in _warned_unknown_lengths:
        return
    _warned_unknown_lengths.add(name)
    warnings.warn(
        f"keras_attn layer {name!r}: its sparse pattern {pattern!r} runs on the dense "
        "path (the whole Tq x Tk score matrix: quadratic memory) because the query and "
        "key lengths are unknown where the function is traced (Received: "
        f"query_length={query_length}, key_length={key_length}), and the block-sparse "
        "path plans its blocks ahead of time. On TensorFlow, Keras retraces "
        "model.fit/predict/evaluate with a length of None once it sees a second input "
        "length. To keep the block-sparse cost, give the model inputs of a few fixed "
        "lengths (pad to buckets), a fixed-length keras.Input, or call it eagerly. "
        "(Shown once per layer.)",
        RuntimeWarning,
        stacklevel=3,
    )


def attend(plan, query, key, value, mask=None, positions=None, training=None,
           return_weights=False, segment_ids=None):  # fmt: skip
    """Run a `Plan` on projected heads.

    Args:
        plan: What `plan` decided for these inputs.
        query: ``(B, Tq, H, D)``; key ``(B, Tk, H, D)``; value ``(B, Tk, H, Dv)``.
        mask: Bool data mask broadcastable to ``(B, H, Tq, Tk)`` (padding, explicit
            masks, cache validity), or None. The pattern is applied here.
        positions: `keras_attn.positions.Positions` of the logits, or None to make
            them from the lengths and the plan's query offset where a path reads them.
        training: Whether dropout (and training-only noise) is active.
        return_weights: Whether to return the weights.
        segment_ids: ``(query_ids (B, Tq), key_ids (B, Tk))`` of packed sequences,
            or None: a segment mask on every path, or the plan's ``segment_layout``.

    Returns:
        ``(output (B, Tq, H, Dv), weights (B, H, Tq, Tk) or None)``.
    """
    offset = plan.query_offset
    if segment_ids is not None and plan.segment_layout is None:
        mask = combine_masks(mask, segment_mask(*segment_ids))  # (B, 1, Tq, Tk)
    elif segment_ids is not None and segment_ids[0] is not segment_ids[1]:
        # The segment-aware layout never forms the segment mask, but a key whose
        # segment no query has (cross attention, cache slots) is masked for every query
        # and must have no influence (a NaN there stays out): mask it as padding. (The
        # (B, Tq, Tk) comparison is a transient; with a cache Tq is the few new tokens.)
        seen = ops.any(segment_mask(*segment_ids), axis=2, keepdims=True)  # (B, 1, 1, Tk)
        mask = combine_masks(mask, seen)
    tq, tk = query.shape[1], key.shape[1]
    if _is_empty(tq, tk):
        # No query, or no key to attend to: zeros on every path (as a row with no
        # allowed key), without running a kernel on an empty axis.
        batch, heads = ops.shape(query)[0], query.shape[2]
        output = ops.zeros((batch, tq, heads, value.shape[-1]), dtype=value.dtype)
        weights = ops.zeros((batch, heads, tq, tk), dtype=value.dtype)
        return output, weights if return_weights else None
    query, key, value = kernels.drop_masked_positions(query, key, value, mask)

    def get_positions():
        # Made only where read, so that the fused path's graph is Keras's own.
        if positions is not None:
            return positions
        return make_positions(
            ops.shape(query)[1], ops.shape(key)[1], query.shape[2], query_offset=offset
        )

    if plan.path == "native" and plan.kernel == "torch_flex_attention":
        output = native.flex_attention(
            query, key, value, plan.components.pattern, scale=plan.scale,
            query_offset=offset, mask=mask,
        )  # fmt: skip
        return output, None
    if plan.path == "native" and plan.kernel == "jax_splash":
        output = native.splash_attention(
            query, key, value, plan.components.pattern, scale=plan.scale, query_offset=offset
        )
        return output, None
    if plan.path == "native":
        output = native.jax_local_attention(query, key, value, scale=plan.scale, window=plan.window)
        return output, None
    if plan.path == "fused":
        pattern = plan.components.pattern
        causal = pattern.kernel_form == "causal"
        if causal and not (isinstance(offset, int) and offset == 0):
            # Absolute positions differ from the kernel's 0-based causal mask.
            mask = combine_masks(mask, pattern.mask(get_positions()))
            causal = False
        output = kernels.fused_attention(
            query, key, value, scale=plan.scale, causal=causal, mask=mask,
            flash_attention=plan.flash_attention,
        )  # fmt: skip
        return output, None
    q = ops.transpose(query, (0, 2, 1, 3))  # (B, H, Tq, D)
    k = ops.transpose(key, (0, 2, 1, 3))  # (B, H, Tk, D)
    v = ops.transpose(value, (0, 2, 1, 3))  # (B, H, Tk, Dv)
    if (
        plan.path == "block_sparse"
        and segment_ids is None  # packed rows: the keras.ops path skips their blocks
        and pallas.applies(plan.components, plan.layout, q.shape[-1], training, return_weights)
    ):
        # Opt-in (KERAS_ATTN_PALLAS): the same layout on the Pallas kernel.
        logger.debug("block_sparse path: kernel %s", pallas.KERNEL)
        output = pallas.block_sparse_attention(
            q, k, v, plan.layout, plan.components, mask=mask, query_offset=offset
        )
        weights = None
    elif plan.path == "block_sparse":
        output, weights = block_sparse_attention(
            q, k, v, plan.layout, plan.components, get_positions(), mask, training,
            return_weights, plan.segment_layout, segment_ids,
        )  # fmt: skip
    else:
        output, weights = kernels.dense_attention(
            q, k, v, plan.components, get_positions(), mask, training, return_weights
        )
    output = ops.transpose(output, (0, 2, 1, 3))  # (B, Tq, H, Dv)
    return output, weights if return_weights else None
