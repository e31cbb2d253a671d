"""Block-sparse attention as a Pallas kernel on JAX, driven by the same `BlockLayout`.

OPT-IN, NOT YET MEASURED ON A GPU. The kernel is exact (tested against the dense
path in Pallas's interpret mode on a CPU: outputs and gradients) and lowered for CUDA
through Triton on a CPU host (`tests/test_lowering.py`), but it has not run or been
timed on a GPU yet, so nothing selects it by default. Set the
environment variable ``KERAS_ATTN_PALLAS``:

- ``1`` (or ``gpu``): the block-sparse path runs this kernel where JAX sees a GPU;
  elsewhere it runs `keras_attn.block_sparse` (keras.ops) as before;
- ``interpret``: also on a CPU, in Pallas's interpret mode (slow; for tests and
  debugging);
- unset or ``0``: never (the default).

What it computes: ``softmax(scale * q · kᵀ)`` over the pairs the pattern and the data
mask allow, i.e. the components whose `Components.softmax_scale` is not None
(scaled_dot + softmax, no score_mods, no weights returned, no dropout). Everything
else (other scores, score_mods, normalizers, dropout, weights) stays on the keras.ops
block-sparse path, which is also the portable fallback (TensorFlow, PyTorch, CPU).
Packed rows (`segment_ids`) also stay there: this kernel does not skip the blocks
whose documents never meet, which the keras.ops path does (`keras_attn.dispatch`).

How: a flash-attention kernel. Each program takes one query block (grid
``(B, H, nq)``) and loops over the key blocks its row keeps in the layout's
``block_mask`` (a static int column list, read inside the kernel), with an online
softmax in float32. The pattern's element mask is evaluated once in numpy, outside
the traced function, on the kept blocks only, and deduplicated into a small table of
``bs x bs`` tiles (tile 0 allows everything; a causal or local pattern needs a couple
more); each kept block reads its tile. Query and key positions past Tq and Tk (the
lengths need not be multiples of the block size) are masked in the same tiles. A
data mask (padding, explicit masks) is read block by block inside the kernel; a mask
on queries only zeroes the rows afterwards. The forward pass saves the row
logsumexp; the backward pass is two more Pallas kernels over the same layout: dq
(by query block) and dk/dv (by key block, over the transposed column lists). A row
with no allowed key gives zeros, never NaN.

GPU notes (unverified until run there): the kernels use only the generic
``pallas_call`` API, lowered through Triton (`_compiler_params`); block sizes must be powers of
two, at least 16 (`applies` checks), and head sizes are zero-padded to a power of two.
"""

import functools
from typing import NamedTuple

import numpy as np
from keras import ops

from keras_attn import block_layout
from keras_attn import devices
from keras_attn.positions import Positions

__all__ = [
    "ENV_VAR",
    "KERNEL",
    "KernelTables",
    "applies",
    "block_sparse_attention",
    "kernel_tables",
    "mode",
]

ENV_VAR = devices.PALLAS_ENV_VAR
KERNEL = "pallas_block_sparse"
MIN_BLOCK_SIZE = 16
# Masked logits: finite, so that a row with no allowed key never forms inf - inf.
_MASKED = -1e30


def mode():
    """``None`` (off, the default), ``"gpu"`` or ``"interpret"``: `keras_attn.devices.pallas_mode`.

    Raises:
        ValueError: An unknown value of `ENV_VAR`.
    """
    return devices.pallas_mode()


def applies(components, layout, head_dim, training=None, return_weights=False):
    """Whether this kernel computes these components on this layout exactly.

    The machine's side (the opt-in, a GPU) is `keras_attn.devices.Machine.pallas_block_sparse`,
    which `keras_attn.dispatch.plan` asks first. Here: a layout whose block size is a
    power of two of at least `MIN_BLOCK_SIZE`, and components that are
    ``softmax(scale * q · kᵀ)`` (`Components.softmax_scale`).
    """
    if layout is None:
        return False
    bs = layout.block_size
    if bs < MIN_BLOCK_SIZE or bs & (bs - 1):
        return False
    dropout_active = components.dropout_active(training)
    return components.softmax_scale(head_dim, return_weights, dropout_active) is not None


# -- the static tables, in numpy --------------------------------------------------------


class KernelTables(NamedTuple):
    """The layout as the kernels read it (numpy, made once per pattern and shape).

    Attributes:
        cols: ``(nq, W)`` int32, the key blocks of each query block row, ascending
            (padding repeats the last, never read).
        counts: ``(nq,)`` int32, how many of `cols` each row keeps.
        tiles: ``(Hm, nq, W)`` int32, the mask tile of each kept block in `masks`.
        rows, row_counts, row_tiles: The same by key block: ``(nk, Wt)`` query blocks,
            ``(nk,)`` counts, ``(Hm, nk, Wt)`` tiles (for the dk/dv kernel).
        masks: ``(M, bs, bs)`` int8 tiles of the element mask (query, key); tile 0
            allows every pair.
    """

    cols: np.ndarray
    counts: np.ndarray
    tiles: np.ndarray
    rows: np.ndarray
    row_counts: np.ndarray
    row_tiles: np.ndarray
    masks: np.ndarray


def _element_mask(pattern, layout, cols, num_heads, query_offset):
    """The pattern's mask on every kept block: bool ``(Hm, nq, W, bs, bs)``."""
    bs, (nq, width) = layout.block_size, cols.shape
    query = np.arange(nq * bs, dtype="int32") + query_offset
    query = query.reshape(1, 1, nq, bs, 1)
    key = (cols[:, :, None] * bs + np.arange(bs)).astype("int32")  # (nq, W, bs)
    key = key.reshape(1, 1, nq, 1, width * bs)
    head = np.arange(num_heads, dtype="int32").reshape(1, num_heads, 1, 1, 1)
    shape = (nq, bs, width * bs)
    if pattern.kernel_form == "full":
        allowed = np.ones((1,) + shape, bool)
    else:
        with block_layout.eager():
            allowed = ops.convert_to_numpy(pattern.mask(Positions(query, key, head)))
        allowed = np.asarray(allowed, bool)
        allowed = allowed.reshape((1,) * (5 - allowed.ndim) + allowed.shape)
        allowed = np.broadcast_to(allowed, (1, allowed.shape[1]) + shape)[0]
    # Positions past the lengths (the last, shorter blocks) are never allowed.
    real_query = np.arange(nq * bs).reshape(nq, bs, 1) < layout.query_length
    real_key = key.reshape(nq, 1, width * bs) < layout.key_length
    allowed = allowed & real_query & real_key  # (Hm, nq, bs, W * bs)
    allowed = allowed.reshape(-1, nq, bs, width, bs)
    return allowed.transpose(0, 1, 3, 2, 4)  # (Hm, nq, W, bs, bs)


def _make_tables(pattern, layout, num_heads, query_offset):
    bs, blocks = layout.block_size, layout.block_mask
    counts = blocks.sum(axis=1).astype("int32")
    width = max(int(counts.max()), 1)
    cols = np.zeros((len(counts), width), "int32")
    for r, kept in enumerate(blocks):
        kept = np.flatnonzero(kept)
        cols[r, : len(kept)] = kept
        cols[r, len(kept) :] = kept[-1] if len(kept) else 0
    allowed = _element_mask(pattern, layout, cols, num_heads, query_offset)
    kept = np.arange(width) < counts[:, None]  # (nq, W)
    heads = allowed.shape[0]
    tiles = np.zeros((heads, len(counts), width), "int32")
    partial = kept[None] & ~allowed.all(axis=(-2, -1))  # (Hm, nq, W)
    masks = [np.ones((bs, bs), bool)]
    if partial.any():
        packed = np.packbits(allowed[partial].reshape(-1, bs * bs), axis=1)
        unique, inverse = np.unique(packed, axis=0, return_inverse=True)
        unpacked = np.unpackbits(unique, axis=1, count=bs * bs).astype(bool)
        masks.extend(unpacked.reshape(-1, bs, bs))
        tiles[partial] = inverse.reshape(-1) + 1
    # The same kept blocks by key block, for the dk/dv kernel.
    r, j = np.nonzero(kept)
    c = cols[r, j]
    order = np.lexsort((r, c))
    r, j, c = r[order], j[order], c[order]
    nk = layout.num_key_blocks
    row_counts = np.bincount(c, minlength=nk).astype("int32")
    row_width = max(int(row_counts.max()), 1)
    slot = np.arange(len(c)) - np.concatenate([[0], np.cumsum(row_counts)[:-1]])[c]
    rows = np.zeros((nk, row_width), "int32")
    rows[c, slot] = r
    row_tiles = np.zeros((heads, nk, row_width), "int32")
    row_tiles[:, c, slot] = tiles[:, r, j]
    return KernelTables(
        cols, counts, tiles, rows, row_counts, row_tiles, np.stack(masks).astype("int8")
    )


@functools.lru_cache(maxsize=64)
def _cached_tables(pattern, layout_key, layout, num_heads, query_offset):
    del layout_key  # the hashable stand-in for the layout
    return _make_tables(pattern, layout, num_heads, query_offset)


def kernel_tables(pattern, layout, num_heads, query_offset=0):
    """The `KernelTables` of `layout` (made from `pattern`), cached per pattern and shape."""
    layout_key = (layout.query_length, layout.key_length, layout.block_size)
    try:
        return _cached_tables(pattern, layout_key, _Unhashed(layout), num_heads, query_offset)
    except TypeError:  # An unhashable pattern: compute without the cache.
        return _make_tables(pattern, layout, num_heads, query_offset)


class _Unhashed:
    """Carries the layout through the cache without hashing its arrays (the key does)."""

    def __init__(self, layout):
        self.layout = layout

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, _Unhashed)

    def __getattr__(self, name):
        return getattr(self.layout, name)


# -- the kernels ------------------------------------------------------------------------


def _dot(a, b, contract):
    """``a · b`` contracting dims `contract` = (dim of a, dim of b), in float32."""
    import jax

    dims = ((contract[:1], contract[1:]), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type="float32")


class _Kernel(NamedTuple):
    """What one kernel is specialized on: `_Static` and the shapes of its tables."""

    scale: float
    bs: int
    width: int  # the table's columns: the most kept blocks of a row (or column) of blocks
    num_blocks: int  # the table's rows: query blocks (forward, dq) or key blocks (dk/dv)
    tile_heads: int  # heads of the tile table (1: shared by every head)
    data: bool  # whether a data mask follows the inputs
    data_per_query: bool  # whether that mask has a query axis


def _kernel(static, table, tables, data):
    """The `_Kernel` of the kernels that walk `table` (``tables.cols`` or ``tables.rows``)."""
    return _Kernel(
        static.scale,
        static.bs,
        table.shape[1],
        table.shape[0],
        tables.tiles.shape[0],
        data is not None,
        _per_query(static),
    )


def _allowed(masks_ref, tile, data_ref, query_start, key_start, kernel):
    """The (bs, bs) bool mask of one block: its pattern tile and the data mask."""
    import jax.experimental.pallas as pl

    bs = kernel.bs
    allowed = masks_ref[pl.ds(tile * bs, bs), :] != 0
    if data_ref is not None:
        query_rows = pl.ds(query_start, bs) if kernel.data_per_query else slice(None)
        allowed = allowed & (data_ref[query_rows, pl.ds(key_start, bs)] != 0)
    return allowed


def _split_refs(refs, num_inputs, kernel):
    """A kernel's refs, as ``pallas_call`` passes them, in four groups.

    Returns:
        ``(table, inputs, data, outputs)``: the four table refs (columns or rows,
        counts, tiles, masks), the `num_inputs` input refs, the data mask's ref (or
        None) and the output refs.
    """
    table, inputs, rest = refs[:4], refs[4 : 4 + num_inputs], refs[4 + num_inputs :]
    data, outputs = (rest[0], rest[1:]) if kernel.data else (None, rest)
    return table, inputs, data, outputs


def _forward_kernel(*refs, kernel):
    import jax
    import jax.experimental.pallas as pl
    import jax.numpy as jnp

    scale, bs, width = kernel.scale, kernel.bs, kernel.width
    table, (q_ref, k_ref, v_ref), data_ref, (o_ref, lse_ref) = _split_refs(refs, 3, kernel)
    cols_ref, counts_ref, tiles_ref, masks_ref = table
    h, i = pl.program_id(1), pl.program_id(2)
    q = q_ref[...]  # (bs, D)
    tile_base = ((h if kernel.tile_heads > 1 else 0) * kernel.num_blocks + i) * width

    def step(j, carry):
        m, total, acc = carry
        start = pl.multiple_of(cols_ref[i * width + j] * bs, bs)
        k = k_ref[pl.ds(start, bs), :]  # (bs, D)
        v = v_ref[pl.ds(start, bs), :]  # (bs, Dv)
        allowed = _allowed(masks_ref, tiles_ref[tile_base + j], data_ref, i * bs, start, kernel)
        s = jnp.where(allowed, _dot(q, k, (1, 1)) * scale, _MASKED)  # (bs, bs) float32
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(allowed, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, (1, 0))
        return m_new, total * alpha + p.sum(axis=1), acc

    init = (
        jnp.full((bs,), _MASKED, "float32"),
        jnp.zeros((bs,), "float32"),
        jnp.zeros((bs, v_ref.shape[-1]), "float32"),
    )
    m, total, acc = jax.lax.fori_loop(0, counts_ref[i], step, init)
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe), 0.0)


def _dq_kernel(*refs, kernel):
    import jax
    import jax.experimental.pallas as pl
    import jax.numpy as jnp

    scale, bs, width = kernel.scale, kernel.bs, kernel.width
    table, inputs, data_ref, (dq_ref,) = _split_refs(refs, 6, kernel)
    cols_ref, counts_ref, tiles_ref, masks_ref = table
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
    h, i = pl.program_id(1), pl.program_id(2)
    q, do = q_ref[...], do_ref[...]  # (bs, D), (bs, Dv)
    lse, delta = lse_ref[...], delta_ref[...]  # (bs,)
    tile_base = ((h if kernel.tile_heads > 1 else 0) * kernel.num_blocks + i) * width

    def step(j, dq):
        start = pl.multiple_of(cols_ref[i * width + j] * bs, bs)
        k = k_ref[pl.ds(start, bs), :]
        v = v_ref[pl.ds(start, bs), :]
        allowed = _allowed(masks_ref, tiles_ref[tile_base + j], data_ref, i * bs, start, kernel)
        p = jnp.where(allowed, jnp.exp(_dot(q, k, (1, 1)) * scale - lse[:, None]), 0.0)
        ds = p * (_dot(do, v, (1, 1)) - delta[:, None])  # (bs, bs)
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    dq = jax.lax.fori_loop(0, counts_ref[i], step, jnp.zeros(q.shape, "float32"))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, kernel):
    import jax
    import jax.experimental.pallas as pl
    import jax.numpy as jnp

    scale, bs, width = kernel.scale, kernel.bs, kernel.width
    table, inputs, data_ref, (dk_ref, dv_ref) = _split_refs(refs, 6, kernel)
    rows_ref, counts_ref, tiles_ref, masks_ref = table
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
    h, c = pl.program_id(1), pl.program_id(2)
    k, v = k_ref[...], v_ref[...]  # (bs, D), (bs, Dv)
    tile_base = ((h if kernel.tile_heads > 1 else 0) * kernel.num_blocks + c) * width

    def step(j, carry):
        dk, dv = carry
        start = pl.multiple_of(rows_ref[c * width + j] * bs, bs)
        q = q_ref[pl.ds(start, bs), :]
        do = do_ref[pl.ds(start, bs), :]
        lse = lse_ref[pl.ds(start, bs)]
        delta = delta_ref[pl.ds(start, bs)]
        allowed = _allowed(masks_ref, tiles_ref[tile_base + j], data_ref, start, c * bs, kernel)
        p = jnp.where(allowed, jnp.exp(_dot(q, k, (1, 1)) * scale - lse[:, None]), 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, (0, 0))  # (bs_k, Dv)
        ds = p * (_dot(do, v, (1, 1)) - delta[:, None])  # (bs_q, bs_k)
        return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv

    init = (jnp.zeros(k.shape, "float32"), jnp.zeros(v.shape, "float32"))
    dk, dv = jax.lax.fori_loop(0, counts_ref[c], step, init)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# -- pallas_call and the gradient -------------------------------------------------------


class _Static(NamedTuple):
    """What the kernels are specialized on (hashable)."""

    scale: float
    bs: int
    interpret: bool
    data_shape: object  # (Bd, Hd, Tqd, Tk) of the int8 data mask, or None


class _Specs:
    """The BlockSpecs of a ``(B, H, n)`` grid whose last axis walks blocks of `bs` rows."""

    def __init__(self, static):
        import jax.experimental.pallas as pl

        self.pl, self.bs, self.static = pl, static.bs, static

    def block(self, depth):
        """Row block ``i`` of a ``(B, H, T, depth)`` array."""
        return self.pl.BlockSpec((None, None, self.bs, depth), lambda b, h, i: (b, h, i, 0))

    def sequence(self, length, depth):
        """All of a ``(B, H, T, depth)`` array (sliced inside the kernel)."""
        return self.pl.BlockSpec((None, None, length, depth), lambda b, h, i: (b, h, 0, 0))

    def vector(self, size, by_block):
        """Row block ``i``, or all, of a ``(B, H, T)`` array."""
        if by_block:
            return self.pl.BlockSpec((None, None, size), lambda b, h, i: (b, h, i))
        return self.pl.BlockSpec((None, None, size), lambda b, h, i: (b, h, 0))

    def table(self, shape):
        return self.pl.BlockSpec(shape, lambda b, h, i: (0,) * len(shape))

    def data(self):
        """The int8 data mask ``(Bd, Hd, Tqd, Tk)``, all of it per batch row and head."""
        if self.static.data_shape is None:
            return []
        bd, hd, tqd, tk = self.static.data_shape

        def index(b, h, i):
            return (b if bd > 1 else 0, h if hd > 1 else 0, 0, 0)

        return [self.pl.BlockSpec((None, None, tqd, tk), index)]


def _table_inputs(cols, counts, tiles, masks):
    import jax.numpy as jnp

    bs = masks.shape[-1]
    arrays = (cols.reshape(-1), counts, tiles.reshape(-1), masks.reshape(-1, bs))
    return [jnp.asarray(a) for a in arrays]


def _forward(static, tables, q, k, v, data):
    import jax
    import jax.experimental.pallas as pl

    batch, heads, tq, depth = q.shape
    tk, dv = k.shape[2], v.shape[-1]
    specs = _Specs(static)
    inputs = _table_inputs(tables.cols, tables.counts, tables.tiles, tables.masks)
    kernel = _kernel(static, tables.cols, tables, data)
    return pl.pallas_call(
        functools.partial(_forward_kernel, kernel=kernel),
        grid=(batch, heads, tq // static.bs),
        in_specs=[specs.table(x.shape) for x in inputs]
        + [specs.block(depth), specs.sequence(tk, depth), specs.sequence(tk, dv)]
        + specs.data(),
        out_specs=[specs.block(dv), specs.vector(static.bs, True)],
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, tq, dv), v.dtype),
            jax.ShapeDtypeStruct((batch, heads, tq), "float32"),  # logsumexp
        ],
        interpret=static.interpret,
        compiler_params=_compiler_params(static),
        name=KERNEL,
    )(*inputs, q, k, v, *([] if data is None else [data]))


def _compiler_params(static):
    """Triton's compiler parameters, which make JAX lower the kernels through Triton.

    Without them JAX (0.10) lowers a ``pallas_call`` for a GPU through Mosaic GPU,
    which fails here: it holds the whole key/value sequences in shared memory.
    """
    if static.interpret:
        return None
    from jax.experimental.pallas import triton

    return triton.CompilerParams(num_warps=4, num_stages=2)


def _per_query(static):
    return static.data_shape is not None and static.data_shape[2] > 1


def _backward(static, tables, q, k, v, data, output, lse, d_output):
    import jax
    import jax.experimental.pallas as pl
    import jax.numpy as jnp

    batch, heads, tq, depth = q.shape
    tk, dv = k.shape[2], v.shape[-1]
    bs = static.bs
    delta = jnp.sum(d_output.astype("float32") * output.astype("float32"), axis=-1)
    extra = [] if data is None else [data]
    specs = _Specs(static)
    blk, seq, vec, table = specs.block, specs.sequence, specs.vector, specs.table
    extra_specs = specs.data()

    inputs = _table_inputs(tables.cols, tables.counts, tables.tiles, tables.masks)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, kernel=_kernel(static, tables.cols, tables, data)),
        grid=(batch, heads, tq // bs),
        in_specs=[table(x.shape) for x in inputs]
        + [blk(depth), seq(tk, depth), seq(tk, dv), blk(dv), vec(bs, True), vec(bs, True)]
        + extra_specs,
        out_specs=blk(depth),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=static.interpret,
        compiler_params=_compiler_params(static),
        name=KERNEL + "_dq",
    )(*inputs, q, k, v, d_output, lse, delta, *extra)

    inputs = _table_inputs(tables.rows, tables.row_counts, tables.row_tiles, tables.masks)
    dk, d_value = pl.pallas_call(
        functools.partial(_dkdv_kernel, kernel=_kernel(static, tables.rows, tables, data)),
        grid=(batch, heads, tk // bs),
        in_specs=[table(x.shape) for x in inputs]
        + [seq(tq, depth), blk(depth), blk(dv), seq(tq, dv), vec(tq, False), vec(tq, False)]
        + extra_specs,
        out_specs=[blk(depth), blk(dv)],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        interpret=static.interpret,
        compiler_params=_compiler_params(static),
        name=KERNEL + "_dkdv",
    )(*inputs, q, k, v, d_output, lse, delta, *extra)
    return dq, dk, d_value


def _attention_fn(static, tables):
    """The kernels with their gradient, as a `jax.custom_vjp`."""
    import jax

    @jax.custom_vjp
    def attention(q, k, v, data):
        return _forward(static, tables, q, k, v, data)[0]

    def forward(q, k, v, data):
        output, lse = _forward(static, tables, q, k, v, data)
        return output, (q, k, v, data, output, lse)

    def backward(residuals, d_output):
        q, k, v, data, output, lse = residuals
        dq, dk, dv = _backward(static, tables, q, k, v, data, output, lse, d_output)
        return dq, dk, dv, None

    attention.defvjp(forward, backward)
    return attention


def _pad(x, axis, size):
    amount = size - x.shape[axis]
    if not amount:
        return x
    widths = [(0, 0)] * len(x.shape)
    widths[axis] = (0, amount)
    return ops.pad(x, widths)


def _next_power_of_two(n):
    return max(MIN_BLOCK_SIZE, 1 << (int(n) - 1).bit_length())


def block_sparse_attention(
    query, key, value, layout, components, mask=None, query_offset=0, interpret=None
):
    """Softmax attention on the kept blocks of `layout`, by the Pallas kernels.

    Equals `keras_attn.block_sparse.block_sparse_attention` (and the dense path) for
    the components `applies` accepts; gradients for query, key and value come from
    the Pallas backward kernels.

    Args:
        query: ``(B, H, Tq, D)``; key ``(B, H, Tk, D)``; value ``(B, H, Tk, Dv)``.
        layout: The `keras_attn.block_layout.BlockLayout` for these lengths and
            `query_offset`, made from the pattern of `components`.
        components: `keras_attn.components.Components` (scaled_dot + softmax).
        mask: Bool data mask broadcastable to ``(B, H, Tq, Tk)``, or None.
        query_offset: Absolute position of the first query (a Python int).
        interpret: Run Pallas in interpret mode; None: unless JAX sees a GPU.

    Returns:
        ``(B, H, Tq, Dv)``, in the value's dtype.
    """
    import jax.numpy as jnp

    batch, heads, tq, depth = query.shape
    tk, dv = key.shape[2], value.shape[-1]
    if (tq, tk) != (layout.query_length, layout.key_length):
        raise ValueError(
            f"The block layout was made for Tq={layout.query_length} and "
            f"Tk={layout.key_length}. Received: query.shape={query.shape}, key.shape={key.shape}"
        )
    scale = components.softmax_scale(depth)
    if scale is None:
        raise ValueError(
            "The Pallas block-sparse kernel computes softmax(scale * q · kᵀ) only "
            "(scaled_dot + softmax, no score_mods). Received: "
            f"score={components.score.name!r}, normalizer={components.normalizer.name!r}, "
            f"score_mods={[m.name for m in components.score_mods]}"
        )
    if interpret is None:
        interpret = devices.actual().pallas_interpret
    tables = kernel_tables(components.pattern, layout, heads, int(query_offset))
    bs = layout.block_size
    tq_pad, tk_pad = layout.num_query_blocks * bs, layout.num_key_blocks * bs
    q = _pad(_pad(query, 3, _next_power_of_two(depth)), 2, tq_pad)  # (B, H, Tq', D')
    k = _pad(_pad(key, 3, _next_power_of_two(depth)), 2, tk_pad)  # (B, H, Tk', D')
    v = _pad(_pad(value, 3, _next_power_of_two(dv)), 2, tk_pad)  # (B, H, Tk', Dv')
    data, row_seen = None, None
    if mask is not None:
        mask = ops.cast(mask, "bool")
        while len(mask.shape) < 4:
            mask = mask[None]
        if mask.shape[-1] == 1:  # queries only: zero those rows afterwards
            row_seen = mask
        else:
            if mask.shape[2] > 1:
                mask = _pad(mask, 2, tq_pad)
            data = ops.cast(_pad(mask, 3, tk_pad), "int8")  # (Bd, Hd, Tqd, Tk')
    static = _Static(float(scale), bs, bool(interpret), None if data is None else data.shape)
    output = _attention_fn(static, tables)(q, k, v, data)
    output = output[:, :, :tq, :dv]  # (B, H, Tq, Dv)
    if row_seen is not None:
        output = jnp.where(row_seen, output, jnp.zeros((), output.dtype))
    return output
