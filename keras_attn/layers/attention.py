"""`Attention`: the engine layer every keras_attn layer is a preset of.

The layer projects its inputs into heads, gathers the masks (`keras_attn.masks`),
writes the key/value cache (`keras_attn.kv_cache`), and hands the heads and one
`keras_attn.components.Components` to `keras_attn.dispatch`, which plans the path
once and runs it. It decides nothing about paths itself.
"""

import contextlib
import logging
import math
import warnings
from operator import attrgetter

import keras
from keras import ops

import keras_attn.layers.shapes as shapes
from keras_attn import context_parallel as context_parallel_module
from keras_attn import dispatch
from keras_attn import kv_cache
from keras_attn import masks
from keras_attn import patterns as patterns_module
from keras_attn import plugins
from keras_attn import positions as positions_module
from keras_attn import qk_norm as qk_norm_module
from keras_attn import saving
from keras_attn import segments
from keras_attn import validation
from keras_attn.components import Components
from keras_attn.components import builtin
from keras_attn.components import score_mods_arg
from keras_attn.layers.overrides import KerasOverrides

logger = logging.getLogger("keras_attn")


@contextlib.contextmanager
def _masks_stay_on_inputs():
    """Project masked inputs without removing their masks (and without the warning).

    Keras warns when a layer that does not support masking (a projection) gets a
    masked tensor; Keras's own attention silences it by removing the caller's masks.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not support masking.*")
        yield


# The options of the projections' weights, with the Keras module that serializes each.
_WEIGHT_OPTIONS = {
    "kernel_initializer": keras.initializers,
    "bias_initializer": keras.initializers,
    "kernel_regularizer": keras.regularizers,
    "bias_regularizer": keras.regularizers,
    "activity_regularizer": keras.regularizers,
    "kernel_constraint": keras.constraints,
    "bias_constraint": keras.constraints,
}


class _Unattached:
    """Holds a value Keras must not track as a sublayer (until `build` attaches it)."""

    def __init__(self, value):
        self.value = value


@builtin("layer")
class Attention(KerasOverrides, keras.layers.Layer):
    """Attention assembled from a score, score_mods, a pattern and a normalizer.

    Projects ``query``, ``key`` and ``value`` into `num_heads` heads, scores every
    allowed (query, key) pair with `score`, adjusts the logits with `score_mods`,
    turns them into weights with `normalizer` over the pairs `pattern` allows, and
    projects the weighted sum of values back. The weights have the layout of
    `keras.layers.MultiHeadAttention` (query, key, value, attention_output).

    The computation runs on one of four paths, chosen automatically: ``"native"``
    (the backend's own kernel for the pattern: cuDNN sliding windows on a GPU with
    JAX, FlexAttention with PyTorch on CUDA, Splash attention on a TPU), ``"fused"``
    (`keras.ops.dot_product_attention`) for scaled_dot + softmax with a full or
    causal pattern and ``value_dim == key_dim``, ``"block_sparse"`` for sparse
    patterns on long inputs, and ``"dense"`` for everything else.
    ``layer.last_path`` tells which one ran last.

    Args:
        num_heads: Number of attention heads.
        key_dim: Size of each head for query and key. Defaults to the query feature
            size divided by `num_heads`.
        value_dim: Size of each head for value. Defaults to `key_dim`.
        output_shape: Size of the output features (an int or a 1-tuple).
            Defaults to the query feature size.
        score: Score: a registry name (``"scaled_dot"``, ``"dot"``, ``"general"``,
            ``"additive"``, ``"cosine"`` or a plugin's), a config dict
            ``{"name": ..., "config": {...}}`` or a `keras_attn.Score` instance.
        score_mods: Sequence of score_mods, each given like `score`.
        pattern: Pattern (``"full"``, ``"causal"``, a `keras_attn.Pattern`, ...).
        normalizer: Normalizer (``"softmax"``, ``"hard"``, ``"topk"``,
            ``"sparsemax"``, ...).
        dropout: Dropout rate on the attention weights.
        use_bias: Whether the projections have biases.
        block_sparse: ``"auto"`` (default) lets the engine choose the block-sparse
            path when it pays off; ``False`` never uses it; ``True`` insists on it.
        block_size: Block size of the block-sparse path.
        flash_attention: Passed to `keras.ops.dot_product_attention` on the fused
            path (``None`` lets the backend decide).
        kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer, activity_regularizer, kernel_constraint,
        bias_constraint: As in `keras.layers.Dense`, for the projections.
        seed: Seed of the dropout.
        position_encoding: Position encoding applied to the projected query and key
            heads before the score, on every path (``"rope"``, a config dict, a
            `keras_attn.PositionEncoding` or None). Keys are encoded before they
            are written to a cache, at their absolute positions.
        reset_positions: With `segment_ids` (or `query_segment_ids` and
            `key_segment_ids`), count positions from the start of
            each segment (a run of equal ids) for the position encoding and the
            score_mods, so a packed document is encoded as if it were alone.
            Patterns keep absolute positions (the same within a segment for
            patterns of ``query - key``, such as causal and local).
        max_segment_length: The longest segment (run of equal `segment_ids`, in
            tokens; padding runs count) any call will carry, or None. It lets a
            traced call (``jax.jit``, ``tf.function``) skip the key blocks whose
            segments never meet on the block-sparse path; eager calls measure their
            ids instead. Known ids holding a longer segment raise a ``ValueError``;
            traced ones cannot, and the rows of query blocks that would need more
            blocks get NaN outputs (never silently fewer keys). It bounds one
            stream (self attention, decoding into a cache), not cross attention.
            Packed ids are assumed (each document one run; see the README's
            "Packed sequences").
        qk_norm: Normalise each head's queries and keys over the head dim, after
            the projections and before the position encoding (so keys are cached
            normalised), on every path: None (default), ``"rms"`` (RMS with a
            learned per-dim scale, as Gemma 3/4, Qwen3 and OLMo 2), ``"l2"``
            (unit length, as cosine attention; no weights), or a Keras layer such
            as ``keras_attn.qk_norm.RMSNorm(epsilon=1e-6, unit_offset=True)``
            (Gemma 3's ``1 + scale``), cloned for the queries and the keys
            (sublayers ``query_norm`` and ``key_norm``, whose weights follow all
            others). Computed in float32 under mixed precision.
        context_parallel: A `keras_attn.ContextParallel` (or its config dict), or
            None. While a `keras.distribution` whose mesh has its axis is active
            (JAX backend), the attention core runs with the sequence sharded over
            that axis (`keras_attn.context_parallel`; ``last_path`` is then
            ``"context_parallel"``); otherwise the layer runs as usual. Raises
            when called on another backend, or with a `cache` while sharding.

    Call arguments:
        query: Query tensor ``(B, Tq, dim)``.
        value: Value tensor ``(B, Tk, dim)``. ``None`` means self-attention.
        key: Key tensor ``(B, Tk, dim)``. Defaults to `value`.
        query_mask: Bool ``(B, Tq)``; taken from the query's Keras mask if unset.
        value_mask: Bool ``(B, Tk)``; taken from the value's Keras mask if unset.
        key_mask: Bool ``(B, Tk)``; taken from the key's Keras mask if unset.
        attention_mask: Bool ``(B, Tq, Tk)``, True where attention is allowed.
        use_causal_mask: Also apply a causal mask (query i sees keys j <= i).
        return_attention_scores: Also return the weights ``(B, H, Tq, Tk)``.
        training: Whether dropout (and training-only noise) is active.
        cache: Key/value cache ``(B, 2, S, H, D)`` for incremental decoding; the
            layer writes the new keys and values at `cache_update_index` and
            attends over the cache. The updated cache is returned.
        cache_update_index: Position of the first query in the cache: a Python or
            numpy int, or a scalar tensor; queries get absolute positions from it.
            With a `cache` and no index, the cache is read as it is and nothing is
            written (KerasHub's convention for a cross-attention cache, computed
            once): the queries' positions are then unknown, so a pattern other than
            full, a score_mod or a position encoding raises a ``ValueError``, and a
            self-attention call (no `value`) warns, as it is surely a mistake.
        segment_ids: Int ``(B, T)`` for packed sequences (self-attention): a query
            attends only to keys with the same id, on every path. Ids are
            compared, so padding may take an id of its own (or use a mask). On
            the block-sparse path, blocks whose segments never meet are not
            computed (see `max_segment_length`); ``layer.last_plan.segment_layout``
            says how many were.
        query_segment_ids: Int ``(B, Tq)``, instead of `segment_ids` (cross
            attention, or the new tokens with a cache).
        key_segment_ids: Int ``(B, Tk)``, instead of `segment_ids`. With a cache it
            is required and covers every cache slot ``(B, S)``: keep it beside the
            cache, writing the new tokens' ids at `cache_update_index`.

    Returns:
        ``output (B, Tq, E)``, then the weights ``(B, H, Tq, Tk)`` if
        `return_attention_scores`, then the updated cache if `cache` was given.
        A query row that may attend to no key gets zero weights and an output of
        just the output bias. The query's Keras mask is kept on the output.
    """

    name = "attention"

    def __init__(
        self,
        num_heads=1,
        key_dim=None,
        value_dim=None,
        output_shape=None,
        score="scaled_dot",
        score_mods=(),
        pattern="full",
        normalizer="softmax",
        dropout=0.0,
        use_bias=True,
        block_sparse="auto",
        block_size=128,
        flash_attention=None,
        num_key_value_heads=None,
        attention_axes=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        seed=None,
        position_encoding=None,
        reset_positions=False,
        max_segment_length=None,
        qk_norm=None,
        context_parallel=None,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.supports_masking = True
        self.num_heads = validation.positive_int(num_heads, "num_heads")
        self._key_dim_arg = validation.positive_int(key_dim, "key_dim", allow_none=True)
        self._value_dim_arg = validation.positive_int(value_dim, "value_dim", allow_none=True)
        validation.number(dropout, "dropout", 0.0, 1.0, high_open=True)
        self.dropout = dropout
        self.use_bias = validation.boolean(use_bias, "use_bias")
        self.flash_attention = flash_attention
        if flash_attention is not None:
            validation.boolean(flash_attention, "flash_attention")
        self.seed = validation.integer(seed, "seed", allow_none=True)
        self.block_sparse = validation.one_of(block_sparse, "block_sparse", ("auto", True, False))
        self.block_size = validation.positive_int(block_size, "block_size", allow_none=True)
        validation.positive_int(num_key_value_heads, "num_key_value_heads", allow_none=True)
        if num_key_value_heads is not None and num_heads % num_key_value_heads:
            raise ValueError(
                "`num_heads` must be divisible by `num_key_value_heads`. Received: "
                f"num_heads={num_heads}, num_key_value_heads={num_key_value_heads}"
            )
        self.num_key_value_heads = num_key_value_heads or num_heads
        if flash_attention and dropout > 0.0:
            raise ValueError(
                "Dropout is not supported when flash attention is enabled. "
                "Please set dropout to 0.0 to use flash attention."
            )
        self._output_shape = shapes.output_shape_arg(output_shape)
        self._attention_axes_arg = shapes.attention_axes_arg(attention_axes)
        score_mods = score_mods_arg(score_mods)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        layer_defaults = {"dtype": self.dtype_policy}
        # Attached as sublayers in `build`, after the projections, so that every
        # layer's weight list starts with the query/key/value/output kernels of
        # `keras.layers.MultiHeadAttention`; until then Keras must not track them.
        self._components = _Unattached(
            Components(
                score=plugins.resolve("score", score, **layer_defaults),
                score_mods=tuple(
                    plugins.resolve("score_mod", m, **layer_defaults) for m in score_mods
                ),
                pattern=plugins.resolve("pattern", pattern),
                normalizer=plugins.resolve("normalizer", normalizer, **layer_defaults),
            )
        )
        self.reset_positions = validation.boolean(reset_positions, "reset_positions")
        self.max_segment_length = validation.positive_int(
            max_segment_length, "max_segment_length", allow_none=True
        )
        self._position_encoding_spec = _Unattached(
            None
            if position_encoding is None
            else plugins.resolve("position_encoding", position_encoding, **layer_defaults)
        )
        self._qk_norm_spec = _Unattached(qk_norm_module.get(qk_norm))
        self._qk_norm_arg = qk_norm_module.serialize(qk_norm)
        self._query_norm = self._key_norm = None  # `qk_norm`'s layers, made by `build`
        self.context_parallel = context_parallel_module.ContextParallel.get(context_parallel)
        self.last_path = None
        self._last_plan = _Unattached(None)

    @property
    def last_plan(self):
        """The `keras_attn.dispatch.Plan` of the last call on the engine, or None.

        Its ``segment_layout`` (with segment ids on the block-sparse path) tells how
        many key blocks each row of query blocks gathered.
        """
        return self._last_plan.value

    # -- components ---------------------------------------------------------------

    @property
    def components(self):
        """The layer's `keras_attn.components.Components` (its own pattern, no dropout)."""
        return self._components.value

    score = property(attrgetter("components.score"), doc="The layer's `keras_attn.Score`.")
    pattern = property(attrgetter("components.pattern"), doc="The layer's `keras_attn.Pattern`.")
    normalizer = property(attrgetter("components.normalizer"), doc="Its `keras_attn.Normalizer`.")

    @property
    def score_mods(self):
        """The layer's score_mods, a list of `keras_attn.ScoreMod`."""
        return list(self.components.score_mods)

    # Read-only handles, as on keras.layers.MultiHeadAttention (set by `build`).
    query_dense = property(attrgetter("_query_dense"))
    key_dense = property(attrgetter("_key_dense"))
    value_dense = property(attrgetter("_value_dense"))
    output_dense = property(attrgetter("_output_dense"))

    @property
    def key_dim(self):
        """Size of each query/key head: the argument, or resolved from the input by `build`."""
        return getattr(self, "_key_dim", None) or self._key_dim_arg

    @property
    def value_dim(self):
        """Size of each value head: the argument, or `key_dim`."""
        return getattr(self, "_value_dim", None) or self._value_dim_arg or self.key_dim

    @property
    def attention_axes(self):
        """The axes attended over: the argument, or resolved from the input by `build`."""
        return getattr(self, "_attention_axes", None) or self._attention_axes_arg

    @property
    def head_dim(self):
        """Size of each query/key head: `key_dim`, or resolved from the input by `build`."""
        return self.key_dim

    def cache_shape(self, batch_size, max_length, use_causal_mask=False):
        """Shape of the key/value cache this layer takes: ``(B, 2, S, H, D)``.

        For a causal sliding window (`keras_attn.patterns.Local` with ``causal=True``,
        or a `Local` called with ``use_causal_mask=True``: say so here) ``S`` is at
        most the window: the cache is a ring that any number of tokens can be decoded
        into, in constant memory (`keras_attn.kv_cache.read_write_ring`).

        Raises:
            ValueError: if the layer is not built (its head size is not known yet), or
                its ``value_dim`` differs from its ``key_dim``.
        """
        if not self.built:
            raise ValueError(
                f"{type(self).__name__} {self.name!r} must be built before its cache shape "
                "is known (the head size may come from the input)."
            )
        if self._value_dim != self._key_dim:  # keys and values share one tensor
            raise ValueError(
                "A key/value cache needs key_dim == value_dim. Received: "
                f"key_dim={self._key_dim}, value_dim={self._value_dim}"
            )
        pattern = patterns_module.with_causal(self.pattern, use_causal_mask)
        window = kv_cache.ring_window(pattern)
        slots = max_length if window is None else min(max_length, window)
        return kv_cache.cache_shape(batch_size, slots, self.num_key_value_heads, self._key_dim)

    # -- build ----------------------------------------------------------------------

    def _get_common_kwargs_for_sublayer(self):
        """Keyword arguments of every projection (Keras's name, for subclasses' `build`)."""

        def clone(initializer):
            # A fresh initializer per sublayer, so that kernels are not identical.
            return initializer.__class__.from_config(initializer.get_config())

        return dict(
            kernel_initializer=clone(self.kernel_initializer),
            bias_initializer=clone(self.bias_initializer),
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            kernel_constraint=self.kernel_constraint,
            bias_constraint=self.bias_constraint,
            dtype=self.dtype_policy,
        )

    def _projection(self, name, input_rank, num_heads, heads_dim, **kwargs):
        equation, bias_axes = shapes.projection_equation(input_rank - 1, 1, 2)
        return keras.layers.EinsumDense(
            equation,
            output_shape=[None] * (input_rank - 2) + [num_heads, heads_dim],
            bias_axes=bias_axes if self.use_bias else None,
            name=name,
            **kwargs,
            **self._get_common_kwargs_for_sublayer(),
        )

    def build(self, query_shape, value_shape=None, key_shape=None):
        value_shape = query_shape if value_shape is None else value_shape
        key_shape = value_shape if key_shape is None else key_shape
        shapes.check_input_shapes(query_shape, value_shape, key_shape)
        # Checked before anything is built, so a failed build leaves no weights behind.
        self.components.check_num_heads(self.num_heads)
        rank = len(query_shape)
        if self._key_dim_arg is None:
            if query_shape[-1] % self.num_heads:
                raise ValueError(
                    "Without `key_dim`, the query feature size must be divisible by "
                    f"`num_heads`. Received: query.shape[-1]={query_shape[-1]}, "
                    f"num_heads={self.num_heads}"
                )
            self._key_dim = query_shape[-1] // self.num_heads
        else:
            self._key_dim = self._key_dim_arg
        self._value_dim = self._value_dim_arg or self._key_dim
        kv_heads = self.num_key_value_heads

        self._query_dense = self._projection("query", rank, self.num_heads, self._key_dim)
        self._query_dense.build(query_shape)
        self._key_dense = self._projection("key", rank, kv_heads, self._key_dim)
        self._key_dense.build(key_shape)
        self._build_extra_projections(query_shape)
        self._value_dense = self._projection("value", rank, kv_heads, self._value_dim)
        self._value_dense.build(value_shape)
        self._build_attention(rank + 1)
        self._output_dense = self._make_output_dense(
            query_shape, self._get_common_kwargs_for_sublayer(), "attention_output"
        )
        self._output_dense.build((*query_shape[:-1], self.num_heads, self._value_dim))
        self._build_components(query_shape, key_shape)
        self._build_qk_norm()

    def _make_output_dense(self, query_shape, common_kwargs, name=None):
        """The output projection ``(B, ..., H, Dv) -> (B, ..., *output_shape)`` (as Keras)."""
        output_shape = self._output_shape or (query_shape[-1],)
        equation, bias_axes = shapes.projection_equation(len(query_shape) - 1, 2, len(output_shape))
        return keras.layers.EinsumDense(
            equation,
            output_shape=[None] * (len(query_shape) - 2) + list(output_shape),
            bias_axes=bias_axes if self.use_bias else None,
            name=name,
            **common_kwargs,
        )

    def _build_attention(self, rank):
        """Resolve the attention axes and make the dropout (Keras's hook, `rank` of the heads)."""
        self._attention_axes = shapes.resolve_attention_axes(self._attention_axes_arg, rank - 1)
        if len(self._attention_axes) > 1 and self.pattern.kernel_form != "full":
            raise ValueError(
                "A pattern orders keys along one axis, so it cannot apply to attention "
                f"over several axes. Received: pattern={plugins.registry_name(self.pattern)!r}, "
                f"attention_axes={self._attention_axes}"
            )
        self._dropout_layer = keras.layers.Dropout(
            self.dropout, seed=self.seed, dtype=self.dtype_policy
        )

    def _build_extra_projections(self, query_shape):
        """Hook for presets that add projections between key and value (a gate)."""

    def _build_components(self, query_shape, key_shape):
        c = self.components
        self._score = c.score
        self._score_mods = list(c.score_mods)
        self._normalizer = c.normalizer
        tq, tk = (self._folded_length(shape) for shape in (query_shape, key_shape))
        heads_q = (None, self.num_heads, tq, self._key_dim)
        logits_shape = (None, self.num_heads, tq, tk)
        c.build(heads_q, logits_shape)
        self._build_position_encoding(heads_q)

    def _folded_length(self, shape):
        # Length of the sequence the engine sees: the product of the attention axes.
        dims = [shape[a] for a in self._attention_axes]
        return None if None in dims else math.prod(dims)

    # -- QK-norm --------------------------------------------------------------------

    query_norm = property(attrgetter("_query_norm"), doc="Query heads' QK-norm layer, or None.")
    key_norm = property(attrgetter("_key_norm"), doc="Key heads' QK-norm layer, or None.")

    def _build_qk_norm(self):
        # Built last, so that the weights of Keras's layers come first, in Keras's order.
        template = self._qk_norm_spec.value
        if template is None:
            return
        self._query_norm = qk_norm_module.clone(template, "query_norm", self.dtype_policy)
        self._query_norm.build((None, None, self.num_heads, self._key_dim))  # (B, T, H, D)
        self._key_norm = qk_norm_module.clone(template, "key_norm", self.dtype_policy)
        self._key_norm.build((None, None, self.num_key_value_heads, self._key_dim))

    def _post_build(self):
        # A subclass whose own `build` replaces this one (written for Keras's class)
        # has not built the QK-norm: build it as the build ends, before the state is
        # locked, once the head size is known.
        if self._qk_norm_spec.value is not None and self.query_norm is None:
            if getattr(self, "_key_dim", None):
                self._build_qk_norm()
        super()._post_build()

    def _normalize_heads(self, q, k):
        """Apply the QK-norm to query heads ``(B, Tq, H, D)`` and key heads ``(B, Tk, Hkv, D)``."""
        if self._qk_norm_spec.value is None:
            return q, k
        if self.query_norm is None:
            raise ValueError(
                f"{type(self).__name__} {self.name!r} has qk_norm={self._qk_norm_arg!r} but "
                "its QK-norm layers were not built: a subclass that overrides `build` must "
                "set `_key_dim` (the head size) or call `super().build(...)`."
            )
        return self._query_norm(q), self._key_norm(k)

    # -- positions and segments -----------------------------------------------------

    @property
    def position_encoding(self):
        """The layer's `keras_attn.PositionEncoding`, or None."""
        return self._position_encoding_spec.value

    def _build_position_encoding(self, heads_shape):
        encoding = self.position_encoding
        if encoding is None:
            return
        encoding.check_head_dim(self._key_dim)
        self._position_encoding = encoding  # tracked from here on, with any weights
        if not encoding.built:
            encoding.build(heads_shape)

    # -- call -----------------------------------------------------------------------

    def call(
        self,
        query,
        value=None,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        use_causal_mask=False,
        return_attention_scores=False,
        training=None,
        cache=None,
        cache_update_index=None,
        segment_ids=None,
        query_segment_ids=None,
        key_segment_ids=None,
    ):
        value = query if value is None else value
        key = value if key is None else key
        self_attention = key is query
        self._check_flash_attention(return_attention_scores)
        padding = masks.Padding.of_call(query, value, key, query_mask, value_mask, key_mask)
        masks.check_call(query, value, key, padding, attention_mask, cache, self.num_heads)
        # A padded position has no influence, not even through a gradient's 0 * nan.
        query, value, key = padding.zero_inputs(query, value, key)
        q, k, v, gate = self._project(query, key, value)  # (B, T, H|Hkv, D) each
        ids = (segment_ids, query_segment_ids, key_segment_ids)
        call_segments = segments.for_call(ids, query, key, cache, cache_update_index, self._packing)
        pattern = patterns_module.with_causal(self.pattern, use_causal_mask)
        if cache is not None:
            self._check_cache(pattern, cache_update_index, self_attention)
        q, k = self._normalize_heads(q, k)
        q, k = positions_module.encode_heads(
            self.position_encoding,
            q,
            k,
            self_attention=self_attention,
            query_offset=0 if cache_update_index is None else cache_update_index,
            cached=cache is not None,
            segments=call_segments,
        )
        extras = (padding.value, padding.key, attention_mask, call_segments)
        window = kv_cache.ring_window_of_call(
            pattern, cache, extras, self._owner, cache_update_index, k.shape[1]
        )
        read = kv_cache.read_write(cache, k, v, cache_update_index, window)
        axes = self._attention_axes if len(query.shape) > 3 else None
        mask = masks.call_mask(padding, attention_mask, read.mask, axes)
        key_heads, value_heads = self._repeat_kv(read.key), self._repeat_kv(read.value)
        heads = dispatch.Heads(q, key_heads, value_heads, mask, call_segments, read.query_offset)
        output, weights = self._attention(heads, pattern, training, return_attention_scores)
        output = self._output_dense(output if gate is None else output * gate)  # (B, Tq, E)
        if padding.query is not None:
            masks.set_keras_mask(output, padding.query)
        result = (output,)
        if return_attention_scores:
            result += (weights,)
        if cache is not None:
            result += (read.cache,)
        return result[0] if len(result) == 1 else result

    @property
    def _owner(self):
        """The layer as error messages name it."""
        return f"{type(self).__name__} {self.name!r}"

    @property
    def _packing(self):
        return segments.Packing(self.reset_positions, self.max_segment_length)

    def _project(self, query, key, value):
        """The query, key and value heads and the gate (None without one) of the inputs."""
        with _masks_stay_on_inputs():
            q = self._query_dense(query)  # (B, Tq, H, D)
            k = self._key_dense(key)  # (B, Tk, Hkv, D)
            v = self._value_dense(value)  # (B, Tk, Hkv, Dv)
            return q, k, v, self._gate(query)

    def _check_cache(self, pattern, cache_update_index, self_attention):
        context_parallel_module.check_no_cache(self.context_parallel, self.name)
        if cache_update_index is None:  # a read-only cache: the queries' positions unknown
            components = self.components.replace(pattern=pattern)
            kv_cache.check_read_only(
                components, self.position_encoding, self._owner, self_attention
            )

    def _check_flash_attention(self, return_attention_scores):
        if self.flash_attention and return_attention_scores:
            raise ValueError(
                "Returning attention scores is not supported when flash attention is "
                "enabled. Please disable flash attention to access attention scores."
            )

    def _gate(self, query):
        return None

    def _repeat_kv(self, heads):
        repeats = self.num_heads // self.num_key_value_heads
        return heads if repeats == 1 else ops.repeat(heads, repeats, axis=-2)

    def _engine(self, heads, pattern, training, return_weights):
        """The attention on `keras_attn.dispatch.Heads` of any rank, through `dispatch.run`."""
        if len(heads.query.shape) > 4:
            return self._engine_over_axes(heads, pattern, training, return_weights)
        dropout = self._dropout_layer if self.dropout else None
        components = self.components.replace(pattern=pattern, dropout=dropout)
        options = dict(training=training, return_weights=return_weights)
        mesh = context_parallel_module.mesh_for(self.context_parallel, self.name)
        if mesh is None:
            output, weights, plan = dispatch.run(components, heads, self._settings, **options)
        else:
            output, weights, plan = context_parallel_module.run(
                components, heads, self.context_parallel, self._settings, mesh=mesh, **options
            )
        self._record_path(plan.path, plan.kernel)
        self._last_plan = _Unattached(plan)
        return output, weights

    def _engine_over_axes(self, heads, pattern, training, return_weights):
        # Heads (B, *axes, H, D) of inputs of rank > 3: folded into one sequence axis.
        folded = shapes.fold_heads(heads, self._attention_axes, pattern)
        output, weights = self._engine(folded, pattern, training, return_weights)
        return shapes.unfold_heads(output, weights, heads, self._attention_axes)

    @property
    def _settings(self):
        fields = ("block_sparse", "block_size", "flash_attention", "max_segment_length", "name")
        return dispatch.Settings(**{field: getattr(self, field) for field in fields})

    def _record_path(self, path, kernel=None):
        if (path, kernel) != (self.last_path, getattr(self.last_plan, "kernel", None)):
            where = f" ({kernel})" if kernel else ""
            logger.debug("%s (%s): %s path%s", self.name, type(self).__name__, path, where)
        self.last_path = path

    # -- shapes and config ----------------------------------------------------------

    def compute_output_shape(self, query_shape, value_shape=None, key_shape=None):
        query_shape = tuple(query_shape)
        value_shape = query_shape if value_shape is None else tuple(value_shape)
        key_shape = value_shape if key_shape is None else tuple(key_shape)
        if value_shape[1:-1] != key_shape[1:-1]:
            raise ValueError(
                "All dimensions of `value` and `key`, except the last one, must be equal. "
                f"Received: value_shape={value_shape} and key_shape={key_shape}"
            )
        return (*query_shape[:-1], *(self._output_shape or query_shape[-1:]))

    def compute_output_spec(
        self,
        query,
        value=None,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        use_causal_mask=False,
        return_attention_scores=False,
        training=None,
        cache=None,
        cache_update_index=None,
        segment_ids=None,
        query_segment_ids=None,
        key_segment_ids=None,
    ):
        value = query if value is None else value
        key = value if key is None else key
        output_shape = self.compute_output_shape(query.shape, value.shape, key.shape)
        output = keras.KerasTensor(output_shape, dtype=self.compute_dtype)
        result = (output,)
        if return_attention_scores:
            key_shape = key.shape if cache is None else (key.shape[0], cache.shape[2])
            scores_shape = shapes.scores_shape(
                query.shape, key_shape, self.num_heads, self._attention_axes_arg
            )
            result += (keras.KerasTensor(scores_shape, dtype=self.compute_dtype),)
        if cache is not None:
            result += (keras.KerasTensor(cache.shape, dtype=cache.dtype),)
        return result[0] if len(result) == 1 else result

    @classmethod
    def from_config(cls, config):
        # Every component the config names is checked before any is built: a file that
        # needs missing plugins names all of them at once, in keras_attn's own error
        # (Keras wraps only TypeErrors, under the whole config).
        saving.check_layer_config(config, owner=f"{cls.__name__} {config.get('name')!r}")
        return super().from_config(config)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self._key_dim_arg,
                "value_dim": self._value_dim_arg,
                "output_shape": self._output_shape,
                "num_key_value_heads": (
                    None if self.num_key_value_heads == self.num_heads else self.num_key_value_heads
                ),
                "attention_axes": self._attention_axes_arg,
                "score": plugins.serialize(self.score),
                "score_mods": [plugins.serialize(m) for m in self.score_mods],
                "pattern": plugins.serialize(self.pattern),
                "normalizer": plugins.serialize(self.normalizer),
                "dropout": self.dropout,
                "use_bias": self.use_bias,
                "block_sparse": self.block_sparse,
                "block_size": self.block_size,
                "flash_attention": self.flash_attention,
                "seed": self.seed,
                "position_encoding": (
                    None
                    if self.position_encoding is None
                    else plugins.serialize(self.position_encoding)
                ),
                "reset_positions": self.reset_positions,
                "max_segment_length": self.max_segment_length,
                "qk_norm": self._qk_norm_arg,
                **{
                    name: module.serialize(getattr(self, name))
                    for name, module in _WEIGHT_OPTIONS.items()
                },
                "context_parallel": (
                    None if self.context_parallel is None else self.context_parallel.get_config()
                ),
            }
        )
        return config
