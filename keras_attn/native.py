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
- JAX on a TPU: Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`)
  for any pattern, with splash's own ``FullMask``, ``CausalMask`` or ``LocalMask``
  where one is exactly the pattern and otherwise a mask evaluated lazily from the
  pattern's ``mask``, a row of blocks at a time, within the blocks its ``block_mask``
  keeps (never a dense Tq x Tk array at once). The plan takes it only for calls with
  no data mask; `splash_attention` itself also takes whole-key or whole-query masks,
  as splash's segment ids, which the plan does not use yet.
"""

import functools

import numpy as np
from keras import ops

from keras_attn import block_layout
from keras_attn import devices
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
    "has_splash_attention",
    "SPLASH_BLOCK_SIZE",
    "splash_attention",
    "splash_attention_available",
    "splash_attention_is_fast",
    "splash_mask",
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
    """Whether cuDNN's kernel can run here for inputs of `dtype` (`devices.Machine.cudnn_window`)."""
    return devices.current().cudnn_window(dtype)


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
    implementation = "cudnn" if devices.actual().cudnn_window(query.dtype) else None
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


def has_flex_attention():
    """Whether the backend is PyTorch with FlexAttention (torch >= 2.5)."""
    machine = devices.current()
    return machine.backend == "torch" and machine.flex_attention


def flex_attention_is_fast():
    """Whether FlexAttention runs as a compiled kernel with a backward pass here.

    True where a CUDA device is visible. On a CPU (torch 2.13), FlexAttention has no
    backward pass, and outside `torch.compile` it forms the whole score matrix.
    """
    return devices.current().flex_attention_is_fast


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

    # A tensor, not a Python int: compiled FlexAttention guards on the ints a
    # mask_mod captures, so each decoding step's offset would compile anew.
    offset = torch.tensor(int(query_offset), dtype=torch.int32, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        positions = Positions(query=q_idx + offset, key=kv_idx, head=h)
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


def _compiles(query):
    """Whether FlexAttention runs compiled: on CUDA, or on a CPU without autograd.

    Compiled FlexAttention has no backward pass on a CPU (torch 2.13): it runs there
    only where no gradient is taken (the plan's ``Call.needs_grad``).
    """
    import torch

    return query.device.type == "cuda" or not torch.is_grad_enabled()


def flex_attention(query, key, value, pattern, *, scale, query_offset=0, mask=None):
    """FlexAttention on projected heads, with the BlockMask of `flex_block_mask`.

    Compiled (`torch.compile`, FlexAttention's fused kernels) on a GPU, and on a CPU
    where autograd is off (the CPU kernel has no backward pass, torch 2.13); else
    FlexAttention's own eager implementation runs.

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
    kernel = _compiled_flex_attention() if _compiles(query) else eager_flex
    q = ops.transpose(query, (0, 2, 1, 3))  # (B, H, Tq, D)
    k = ops.transpose(key, (0, 2, 1, 3))  # (B, H, Tk, D)
    v = ops.transpose(value, (0, 2, 1, 3))  # (B, H, Tk, Dv)
    output = kernel(q, k, v, block_mask=block_mask, scale=float(scale))
    return ops.transpose(output, (0, 2, 1, 3))  # (B, Tq, H, Dv)


# -- JAX on TPU: Splash attention --------------------------------------------------------

# Splash attention's tile on both axes; lengths are padded up to a multiple of it.
SPLASH_BLOCK_SIZE = 128
# Every query row starts from this logit (splash's per-head "sink") with weight 1:
# exp(it - m) is exactly 0 in float32 for any real logit m above -1e38, so a row with
# an allowed key gets exactly softmax(logits), and a row with none gets zeros (the
# dense path's answer) instead of splash's 0 / 0 or an average of masked keys.
_EMPTY_ROW_LOGIT = -0.35 * float(np.finfo("float32").max)


def has_splash_attention():
    """Whether the backend is JAX with Splash attention (`jax.experimental.pallas`)."""
    machine = devices.current()
    return machine.backend == "jax" and machine.splash_attention


def splash_attention_is_fast():
    """Whether Splash attention runs as a compiled kernel here: JAX's default backend is a TPU.

    Elsewhere it runs only in Pallas's interpret mode (slow; used by the tests).
    """
    return has_splash_attention() and devices.current().platform == "tpu"


def _padded(length):
    return block_layout.num_blocks(length, SPLASH_BLOCK_SIZE) * SPLASH_BLOCK_SIZE


def splash_mask(pattern, query_length, key_length, query_offset=0, num_heads=1):
    """Splash's ``MultiHeadMask`` for `pattern`, over lengths padded to `SPLASH_BLOCK_SIZE`.

    Splash's own computable masks where they are exactly the pattern (``FullMask``,
    ``CausalMask`` and ``LocalMask``, offset by the first query's position); any other
    pattern is evaluated lazily, a row of blocks at a time (`_PatternStripes`). Padded
    keys are not masked here (`splash_attention` gives them a segment of their own).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    shape = (_padded(query_length), _padded(key_length))
    offset = int(query_offset)
    window = jax_window(pattern)
    if pattern.kernel_form == "full":
        head_masks = [sm.FullMask(shape)]
    elif pattern.kernel_form == "causal":
        head_masks = [sm.CausalMask(shape, offset=offset)]
    elif window is not None:
        head_masks = [sm.LocalMask(shape, window_size=window, offset=offset)]
    else:
        stripes = _PatternStripes(pattern, query_length, key_length, offset, num_heads)
        head_masks = [_splash_pattern_mask(stripes, h) for h in range(stripes.num_masks)]
    if len(head_masks) == 1:
        head_masks = head_masks * num_heads
    return sm.MultiHeadMask(head_masks)


class _PatternStripes:
    """A pattern's mask, evaluated lazily in numpy on the regions splash asks for.

    Within each row of `SPLASH_BLOCK_SIZE` queries, only the key blocks the pattern's
    closed-form ``block_mask`` keeps are evaluated (the rest is False).
    ``num_masks`` is 1 for a pattern that does not read ``positions.head``, else H.
    """

    def __init__(self, pattern, query_length, key_length, query_offset, num_heads):
        self.pattern = pattern
        self.lengths = (int(query_length), int(key_length))
        self.offset = query_offset
        self.num_heads = num_heads
        self.padded = (_padded(query_length), _padded(key_length))
        layout = block_layout.block_layout(
            pattern, query_length, key_length, SPLASH_BLOCK_SIZE, query_offset
        )
        self.block_mask = layout.block_mask  # (nq, nk)
        # The mask's head axis, from broadcasting alone (one query, one key).
        probe = self._evaluate_pattern(np.zeros(1, "int32"), np.zeros(1, "int32"))
        self.num_masks = probe.shape[0]
        self._last = None

    def _evaluate_pattern(self, query, key):
        """``(num_masks, len(query), len(key))``: the pattern at these absolute positions."""
        positions = Positions(
            query=query.reshape(1, 1, -1, 1),
            key=key.reshape(1, 1, 1, -1),
            head=np.arange(self.num_heads, dtype="int32").reshape(1, -1, 1, 1),
        )
        with block_layout.eager():  # also while the caller's function is traced
            m = ops.convert_to_numpy(self.pattern.mask(positions)).astype(bool)
        while m.ndim < 4:
            m = m[None]
        m = np.broadcast_to(m, m.shape[:-2] + (len(query), len(key)))
        return m.reshape((-1,) + m.shape[-3:]).any(axis=0)

    def region(self, q_start, q_stop, k_start, k_stop):
        """``(num_masks, q_stop - q_start, k_stop - k_start)`` bool: this part of the mask.

        Only the part asked for is evaluated (splash reads the mask a block or a row
        of blocks at a time, in several orders), one pattern call per row of blocks
        it touches; the last region is kept, as splash often asks for it again.
        """
        key = (q_start, q_stop, k_start, k_stop)
        if self._last is None or self._last[0] != key:
            self._last = (key, self._evaluate_region(*key))
        return self._last[1]

    def _evaluate_region(self, q_start, q_stop, k_start, k_stop):
        tq, tk = self.lengths
        size = SPLASH_BLOCK_SIZE
        out = np.zeros((self.num_masks, q_stop - q_start, k_stop - k_start), bool)
        for row in range(q_start // size, -(-q_stop // size)):
            first, last = max(q_start, row * size), min(q_stop, (row + 1) * size, tq)
            if last <= first or row >= self.block_mask.shape[0]:
                continue  # padded queries: their outputs are dropped
            keys = [
                np.arange(max(k_start, b * size), min(k_stop, (b + 1) * size, tk))
                for b in np.flatnonzero(self.block_mask[row])
            ]
            keys = np.concatenate(keys) if keys else np.zeros(0, "int64")
            if not len(keys):
                continue
            query = np.arange(first, last) + self.offset
            m = self._evaluate_pattern(query.astype("int32"), keys.astype("int32"))
            out[:, first - q_start : last - q_start, keys - k_start] = m
        return out


@functools.cache
def _splash_mask_class():
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    class PatternMask(sm.Mask):
        """One head of a `_PatternStripes` as a lazy splash ``Mask`` (sliced by blocks)."""

        def __init__(self, stripes, head):
            self.stripes, self.head = stripes, head

        @property
        def shape(self):
            return self.stripes.padded

        def __getitem__(self, idx):
            q_slice, k_slice = idx
            q_start, q_stop, q_step = q_slice.indices(self.shape[0])
            k_start, k_stop, k_step = k_slice.indices(self.shape[1])
            if q_step != 1 or k_step != 1:
                raise NotImplementedError(f"Strided slices of a pattern mask: {idx}")
            return self.stripes.region(q_start, q_stop, k_start, k_stop)[self.head]

        def __eq__(self, other):
            return self is other

        def __hash__(self):
            return id(self)

    return PatternMask


def _splash_pattern_mask(stripes, head):
    return _splash_mask_class()(stripes, head)


@functools.lru_cache(maxsize=64)
def _splash_kernel(pattern, query_length, key_length, query_offset, num_heads, interpret):
    """The splash kernel for this pattern and these lengths (its mask processed once)."""
    import jax
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    size = SPLASH_BLOCK_SIZE
    blocks = sk.BlockSizes(
        block_q=size,
        block_kv=size,
        block_kv_compute=size,
        block_q_dkv=size,
        block_kv_dkv=size,
        block_kv_dkv_compute=size,
        block_q_dq=size,
        block_kv_dq=size,
    )
    mask = splash_mask(pattern, query_length, key_length, query_offset, num_heads)
    # Made once and cached, usually while a caller's function is traced: its mask
    # tables must be concrete arrays, not tracers of that trace (leaked into the
    # next one, e.g. Keras's predict function after its train function).
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(
            mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
        )


def _segment_ids(mask, batch, query_length, key_length):
    """``(query (B, Tq'), key (B, Tk'))`` segment ids: 0 where allowed, padded keys 1.

    `mask` (or None) must allow or forbid whole keys ``(B|1, 1, 1, Tk)`` or whole
    queries ``(B|1, 1, Tq, 1)``: a forbidden key takes segment 1, a forbidden query
    segment 2 (it sees no key, so it gets zeros).
    """
    import jax.numpy as jnp

    pq, pk = _padded(query_length) - query_length, _padded(key_length) - key_length
    q_ids = jnp.zeros((batch, query_length), "int32")
    k_ids = jnp.zeros((batch, key_length), "int32")
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        while mask.ndim < 4:
            mask = mask[None]
        if mask.shape[1] != 1 or (mask.shape[2] != 1 and mask.shape[3] != 1):
            raise ValueError(
                "Splash attention takes a data mask over whole keys (B, 1, 1, Tk) or whole "
                f"queries (B, 1, Tq, 1) only. Received: mask.shape={tuple(mask.shape)}"
            )
        if mask.shape[2] == 1:
            k_ids = jnp.broadcast_to(jnp.where(mask[:, 0, 0, :], 0, 1), (batch, key_length))
        else:
            q_ids = jnp.broadcast_to(jnp.where(mask[:, 0, :, 0], 0, 2), (batch, query_length))
    q_ids = jnp.pad(q_ids, ((0, 0), (0, pq)))
    k_ids = jnp.pad(k_ids, ((0, 0), (0, pk)), constant_values=1)
    return q_ids.astype("int32"), k_ids.astype("int32")


def splash_attention(
    query, key, value, pattern, *, scale, query_offset=0, mask=None, interpret=None
):
    """Splash attention (Pallas, TPU) on projected heads, with a mask made from `pattern`.

    Lengths are padded to `SPLASH_BLOCK_SIZE` (padded keys take a segment of their
    own); the queries are scaled before the kernel (splash does not scale); the kernel
    runs per batch element (``vmap``). Compiled on a TPU, in Pallas's interpret mode
    elsewhere (the tests).

    Args:
        query: ``(B, Tq, H, D)``; key ``(B, Tk, K, D)``; value ``(B, Tk, K, Dv)``, with
            ``H`` a multiple of ``K`` (grouped-query attention).
        pattern: The `keras_attn.Pattern`; query_offset: its first query's position
            (a Python int).
        scale: The score's factor (``scaled_dot``: ``1 / sqrt(D)``).
        mask: None, or a bool mask over whole keys ``(B|1, 1, 1, Tk)`` or whole
            queries ``(B|1, 1, Tq, 1)`` (`_segment_ids`).
        interpret: Run Pallas in interpret mode; None: unless JAX's default backend
            is a TPU. False builds the compiled TPU kernel anywhere, e.g. to lower it
            for a TPU on a CPU host with ``jax.export`` (`tests/test_lowering.py`).

    Returns:
        ``(B, Tq, H, Dv)`` in the query's dtype; a query with no allowed key gets zeros.
    """
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    batch, tq, heads, _ = query.shape
    tk, groups = key.shape[1], heads // key.shape[2]
    if interpret is None:
        interpret = devices.actual().platform != "tpu"
    kernel = _splash_kernel(pattern, tq, tk, int(query_offset), heads, interpret)
    dtype = query.dtype
    q = jnp.transpose(query * jnp.asarray(scale, dtype), (0, 2, 1, 3))  # (B, H, Tq, D)
    k = jnp.transpose(key, (0, 2, 1, 3))  # (B, K, Tk, D)
    v = jnp.transpose(value, (0, 2, 1, 3))  # (B, K, Tk, Dv)
    if groups > 1:
        k = jnp.repeat(k, groups, axis=1)  # (B, H, Tk, D)
        v = jnp.repeat(v, groups, axis=1)  # (B, H, Tk, Dv)
    pad_q, pad_k = _padded(tq) - tq, _padded(tk) - tk
    q = jnp.pad(q, ((0, 0), (0, 0), (0, pad_q), (0, 0)))  # (B, H, Tq', D)
    k = jnp.pad(k, ((0, 0), (0, 0), (0, pad_k), (0, 0)))  # (B, H, Tk', D)
    v = jnp.pad(v, ((0, 0), (0, 0), (0, pad_k), (0, 0)))  # (B, H, Tk', Dv)
    q_ids, k_ids = _segment_ids(mask, batch, tq, tk)
    sinks = jnp.full((heads,), _EMPTY_ROW_LOGIT, "float32")

    def one(q, k, v, q_ids, k_ids):
        return kernel(q, k, v, segment_ids=sk.SegmentIds(q_ids, k_ids), sinks=sinks)

    output = jax.vmap(one)(q, k, v, q_ids, k_ids)  # (B, H, Tq', Dv)
    return jnp.transpose(output[:, :, :tq], (0, 2, 1, 3)).astype(dtype)  # (B, Tq, H, Dv)


def splash_attention_available(dtype):
    """Whether the plan may take Splash attention for heads of `dtype` (a TPU; f32/bf16)."""
    return devices.current().splash(dtype)
