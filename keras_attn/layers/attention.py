"""`Attention`: the engine layer every keras_attn layer is a preset of.

The layer projects its inputs into heads, gathers the masks (`keras_attn.masks`),
writes the key/value cache (`keras_attn.kv_cache`), and hands the heads and one
`keras_attn.components.Components` to `keras_attn.dispatch`, which plans the path
once and runs it. It decides nothing about paths itself.
"""

import logging

import keras
from keras import ops

from keras_attn import dispatch
from keras_attn import kv_cache
from keras_attn import masks
from keras_attn import patterns as patterns_module
from keras_attn import plugins
from keras_attn import segments
from keras_attn import validation
from keras_attn.components import Components
from keras_attn.components import builtin

logger = logging.getLogger("keras_attn")


class _Unattached:
    """Holds a value Keras must not track as a sublayer (until `build` attaches it)."""

    def __init__(self, value):
        self.value = value


@builtin("layer")
class Attention(keras.layers.Layer):
    """Attention assembled from a score, score_mods, a pattern and a normalizer.

    Projects ``query``, ``key`` and ``value`` into `num_heads` heads, scores every
    allowed (query, key) pair with `score`, adjusts the logits with `score_mods`,
    turns them into weights with `normalizer` over the pairs `pattern` allows, and
    projects the weighted sum of values back. The weights have the layout of
    `keras.layers.MultiHeadAttention` (query, key, value, attention_output).

    The computation runs on one of three paths, chosen automatically: ``"fused"``
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
        reset_positions: With `segment_ids`, count positions from the start of
            each segment (a run of equal ids) for the position encoding and the
            score_mods, so a packed document is encoded as if it were alone.
            Patterns keep absolute positions (the same within a segment for
            patterns of ``query - key``, such as causal and local).

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
        cache_update_index: Position (int or scalar tensor) of the first query in
            the cache; queries get absolute positions from it.
        segment_ids: Int ``(B, T)`` for packed sequences (self-attention): a query
            attends only to keys with the same id, on every path. Ids are
            compared, so padding may take an id of its own (or use a mask).
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
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.supports_masking = True
        validation.positive_int(num_heads, "num_heads")
        validation.positive_int(key_dim, "key_dim", allow_none=True)
        validation.positive_int(value_dim, "value_dim", allow_none=True)
        validation.number(dropout, "dropout", 0.0, 1.0, high_open=True)
        validation.boolean(use_bias, "use_bias")
        if flash_attention is not None:
            validation.boolean(flash_attention, "flash_attention")
        validation.integer(seed, "seed", allow_none=True)
        if not (isinstance(block_sparse, bool) or block_sparse == "auto"):
            raise ValueError(
                "`block_sparse` must be 'auto', True or False. "
                f"Received: block_sparse={block_sparse!r}"
            )
        validation.positive_int(block_size, "block_size", allow_none=True)
        if isinstance(output_shape, (list, tuple)):
            if len(output_shape) != 1:
                raise ValueError(
                    "`output_shape` must be an int or a 1-tuple (inputs are (B, T, dim)). "
                    f"Received: output_shape={output_shape}"
                )
            output_shape = output_shape[0]
        validation.positive_int(output_shape, "output_shape", allow_none=True)
        if isinstance(score_mods, (str, dict)) or plugins.kind_of(score_mods) is not None:
            score_mods = [score_mods]
        if not isinstance(score_mods, (list, tuple)):
            raise ValueError(
                "`score_mods` must be a list of score_mods (names, config dicts or "
                f"instances). Received: score_mods={score_mods!r}"
            )
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.output_shape_ = output_shape
        self.dropout = dropout
        self.use_bias = use_bias
        self.block_sparse = block_sparse
        self.block_size = block_size
        self.flash_attention = flash_attention
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.seed = seed
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
        self._position_encoding_spec = _Unattached(
            None
            if position_encoding is None
            else plugins.resolve("position_encoding", position_encoding, **layer_defaults)
        )
        self.last_path = None

    # -- components ---------------------------------------------------------------

    @property
    def components(self):
        """The layer's `keras_attn.components.Components` (its own pattern, no dropout)."""
        return self._components.value

    @property
    def score(self):
        return self.components.score

    @property
    def score_mods(self):
        return list(self.components.score_mods)

    @property
    def pattern(self):
        return self.components.pattern

    @property
    def normalizer(self):
        return self.components.normalizer

    # Read-only handles, as on keras.layers.MultiHeadAttention (set by `build`).

    @property
    def query_dense(self):
        return self._query_dense

    @property
    def key_dense(self):
        return self._key_dense

    @property
    def value_dense(self):
        return self._value_dense

    @property
    def output_dense(self):
        return self._output_dense

    @property
    def head_dim(self):
        """Size of each query/key head: `key_dim`, or resolved from the input by `build`."""
        return self._key_dim if self.built else self.key_dim

    def cache_shape(self, batch_size, max_length):
        """Shape of the key/value cache this layer takes: ``(B, 2, S, H, D)``.

        Raises:
            ValueError: if the layer is not built (its head size is not known yet).
        """
        if not self.built:
            raise ValueError(
                f"{type(self).__name__} {self.name!r} must be built before its cache shape "
                "is known (the head size may come from the input)."
            )
        return kv_cache.cache_shape(batch_size, max_length, self.num_heads, self._key_dim)

    # -- build ----------------------------------------------------------------------

    def _dense_kwargs(self):
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

    def _projection(self, name, heads_dim):
        return keras.layers.EinsumDense(
            "abc,cde->abde",
            output_shape=(None, self.num_heads, heads_dim),
            bias_axes="de" if self.use_bias else None,
            name=name,
            **self._dense_kwargs(),
        )

    def _check_shapes(self, query_shape, value_shape, key_shape):
        for arg, shape in (("query", query_shape), ("value", value_shape), ("key", key_shape)):
            if len(shape) != 3:
                raise ValueError(
                    f"`{arg}` must have rank 3, (batch, length, features). "
                    f"Received: {arg}.shape={tuple(shape)}"
                )
            if shape[-1] is None:
                raise ValueError(
                    f"The last dimension of `{arg}` must be known. "
                    f"Received: {arg}.shape={tuple(shape)}"
                )
        if (
            value_shape[1] is not None
            and key_shape[1] is not None
            and value_shape[1] != key_shape[1]
        ):
            raise ValueError(
                "`key` and `value` must have the same length. Received: "
                f"key.shape={tuple(key_shape)}, value.shape={tuple(value_shape)}"
            )

    def build(self, query_shape, value_shape=None, key_shape=None):
        value_shape = query_shape if value_shape is None else value_shape
        key_shape = value_shape if key_shape is None else key_shape
        self._check_shapes(query_shape, value_shape, key_shape)
        self._check_score_mods()
        if self.key_dim is None:
            if query_shape[-1] % self.num_heads:
                raise ValueError(
                    "Without `key_dim`, the query feature size must be divisible by "
                    f"`num_heads`. Received: query.shape[-1]={query_shape[-1]}, "
                    f"num_heads={self.num_heads}"
                )
            self._key_dim = query_shape[-1] // self.num_heads
        else:
            self._key_dim = self.key_dim
        self._value_dim = self.value_dim or self._key_dim
        output_dim = self.output_shape_ or query_shape[-1]

        self._query_dense = self._projection("query", self._key_dim)
        self._query_dense.build(query_shape)
        self._key_dense = self._projection("key", self._key_dim)
        self._key_dense.build(key_shape)
        self._build_extra_projections(query_shape)
        self._value_dense = self._projection("value", self._value_dim)
        self._value_dense.build(value_shape)
        self._output_dense = keras.layers.EinsumDense(
            "abcd,cde->abe",
            output_shape=(None, output_dim),
            bias_axes="e" if self.use_bias else None,
            name="attention_output",
            **self._dense_kwargs(),
        )
        self._output_dense.build((query_shape[0], query_shape[1], self.num_heads, self._value_dim))
        self._dropout_layer = keras.layers.Dropout(
            self.dropout, seed=self.seed, dtype=self.dtype_policy
        )
        self._build_components(query_shape, key_shape)

    def _check_score_mods(self):
        # Checked before anything is built, so a failed build leaves no weights behind.
        for i, mod in enumerate(self.components.score_mods):
            heads = getattr(mod, "num_heads", None)
            if heads is not None and heads != self.num_heads:
                raise ValueError(
                    f"score_mod {plugins.registry_name(mod)!r} was made for another number "
                    f"of heads than the layer's num_heads={self.num_heads}. "
                    f"Received: score_mods[{i}].num_heads={heads}"
                )

    def _build_extra_projections(self, query_shape):
        """Hook for presets that add projections between key and value (a gate)."""

    def _build_components(self, query_shape, key_shape):
        c = self.components
        self._score = c.score
        self._score_mods = list(c.score_mods)
        self._normalizer = c.normalizer
        heads_q = (query_shape[0], self.num_heads, query_shape[1], self._key_dim)
        logits_shape = (query_shape[0], self.num_heads, query_shape[1], key_shape[1])
        if not c.score.built:
            c.score.build(heads_q)
        for mod in c.score_mods:
            if getattr(mod, "num_heads", "unset") is None:
                mod.num_heads = self.num_heads
            if not mod.built:
                mod.build(logits_shape)
        if not c.normalizer.built:
            c.normalizer.build(logits_shape)
        self._build_position_encoding(heads_q)

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

    def _segments(self, query, key, cache, cache_update_index, segment_ids, query_ids, key_ids):
        """The call's `keras_attn.segments.Segments` (its mask and starts), or None."""
        query_name = "query_segment_ids" if query_ids is not None else "segment_ids"
        key_name = "key_segment_ids" if key_ids is not None else "segment_ids"
        query_ids = segment_ids if query_ids is None else query_ids
        key_ids = segment_ids if key_ids is None else key_ids
        if query_ids is None and key_ids is None:
            return None
        if query_ids is None or key_ids is None:
            raise ValueError(
                "Pass `segment_ids` (self-attention), or both `query_segment_ids` and "
                "`key_segment_ids`. Received: only one of them."
            )
        if len(query.shape) != 3:
            raise ValueError(
                f"Segment ids need (B, T, dim) inputs. Received: query.shape={tuple(query.shape)}"
            )
        segments.check_segment_ids(query_ids, query_name, query.shape[1], "the query length")
        if cache is None:
            segments.check_segment_ids(key_ids, key_name, key.shape[1], "the key length")
        else:
            segments.check_segment_ids(
                key_ids, key_name, cache.shape[2],
                "the number of cache slots: with a cache, `key_segment_ids` covers every slot",
            )  # fmt: skip
        mask = segments.segment_mask(query_ids, key_ids)  # (B, 1, Tq, Tk)
        if not self.reset_positions:
            return segments.Segments(mask)
        key_starts = segments.segment_starts(key_ids)  # (B, Tk)
        if cache is not None and cache_update_index is not None:
            # Decoding: the queries are the tokens written at the cache index.
            index = ops.arange(ops.shape(query_ids)[1], dtype="int32")
            query_starts = ops.take(
                key_starts, index + ops.cast(cache_update_index, "int32"), axis=1
            )
        else:
            query_starts = segments.segment_starts(query_ids)
        return segments.Segments(mask, query_starts, key_starts)

    def _encode_positions(self, q, k, self_attention, cache, cache_update_index, call_segments):
        """Apply the position encoding to the projected heads ``(B, T, H, D)``.

        Positions are absolute (from the cache index with a cache, so the keys written
        to the cache are encoded where they stand), or counted from each token's
        segment start with `reset_positions`.
        """
        encoding = self.position_encoding
        if encoding is None:
            return q, k
        if len(q.shape) != 4:
            raise ValueError(
                "A position encoding needs (B, T, dim) inputs (one sequence axis). "
                f"Received: heads of shape {tuple(q.shape)}"
            )
        offset = 0 if cache is None or cache_update_index is None else cache_update_index
        offset = ops.cast(offset, "int32")
        query_positions = ops.arange(ops.shape(q)[1], dtype="int32")[None, :] + offset  # (1, Tq)
        key_positions = ops.arange(ops.shape(k)[1], dtype="int32")[None, :] + offset  # (1, Tk)
        if cache is None:
            key_positions = key_positions - offset
        if call_segments is not None and call_segments.reset_positions:
            query_positions = call_segments.query_positions(query_positions, offset)  # (B, Tq)
            key_positions = call_segments.key_positions(key_positions)  # (B, Tk)
        qh = ops.transpose(q, (0, 2, 1, 3))  # (B, H, Tq, D)
        kh = ops.transpose(k, (0, 2, 1, 3))  # (B, Hkv, Tk, D)
        if self_attention:
            qh, kh = encoding(qh, kh, query_positions[:, None, :])
        else:
            qh = encoding(qh, qh, query_positions[:, None, :])[0]
            kh = encoding(kh, kh, key_positions[:, None, :])[1]
        return ops.transpose(qh, (0, 2, 1, 3)), ops.transpose(kh, (0, 2, 1, 3))

    def _segment_score_mods(self, call_segments, query_offset):
        """The score_mods seeing positions restarted at each segment, or None (as they are)."""
        mods = self.components.score_mods
        if call_segments is None or not call_segments.reset_positions or not mods:
            return None
        return tuple(segments.SegmentRelative(m, call_segments, query_offset) for m in mods)

    # -- call -----------------------------------------------------------------------

    def _effective_pattern(self, use_causal_mask):
        pattern = self.pattern
        if not use_causal_mask or pattern.causal:
            return pattern
        if pattern.kernel_form == "full":
            return patterns_module.Causal()
        return pattern & patterns_module.Causal()

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
        if value is None:
            value = query
        if key is None:
            key = value
        key_length = key.shape[1] if cache is None else cache.shape[2]
        masks.check_attention_mask(attention_mask, query.shape[1], key_length)
        # Masks not passed explicitly come from the inputs' Keras masks.
        if query_mask is None:
            query_mask = masks.get_keras_mask(query)
        if value_mask is None:
            value_mask = masks.get_keras_mask(value)
        if key_mask is None and key is not value:
            key_mask = masks.get_keras_mask(key)
        mask = masks.data_mask(query_mask, value_mask, key_mask, attention_mask)
        # The masks are in `mask` now. Take them off the inputs, as Keras's
        # MultiHeadAttention does, so that the projections do not warn about them.
        for tensor in (query, value, key):
            masks.set_keras_mask(tensor, None)
        # A padded position has no influence, not even through a gradient's 0 * nan.
        query, value, key = masks.zero_padded_inputs(
            query, value, key, query_mask, value_mask, key_mask
        )

        q = self._query_dense(query)  # (B, Tq, H, D)
        k = self._key_dense(key)  # (B, Tk, H, D)
        gate = self._gate(query)
        v = self._value_dense(value)  # (B, Tk, H, Dv)

        call_segments = self._segments(
            query, key, cache, cache_update_index, segment_ids, query_segment_ids, key_segment_ids
        )
        q, k = self._encode_positions(q, k, key is query, cache, cache_update_index, call_segments)
        query_offset = 0
        if cache is not None:
            k, v, cache, cache_mask = self._update_cache(k, v, cache, cache_update_index)
            query_offset = cache_update_index
            mask = masks.combine_masks(mask, cache_mask)
        if call_segments is not None:
            mask = masks.combine_masks(mask, call_segments.mask)
        pattern = self._effective_pattern(use_causal_mask)
        # Score_mods restarted at each segment (`reset_positions`), passed only when used.
        score_mods = self._segment_score_mods(call_segments, query_offset)
        extra = {} if score_mods is None else {"score_mods": score_mods}

        output, scores = self._compute_attention(
            q,
            k,
            v,
            mask,
            training,
            return_attention_scores,
            pattern=pattern,
            query_offset=query_offset,
            **extra,
        )
        if gate is not None:
            output = output * gate
        output = self._output_dense(output)  # (B, Tq, E)
        if query_mask is not None:
            masks.set_keras_mask(output, query_mask)
        result = (output,)
        if return_attention_scores:
            result += (scores,)
        if cache is not None:
            result += (cache,)
        return result[0] if len(result) == 1 else result

    def _gate(self, query):
        return None

    def _update_cache(self, k, v, cache, cache_update_index):
        if cache_update_index is None:
            raise ValueError("`cache_update_index` is required when `cache` is given.")
        kv_cache.check_cache(cache, self.num_heads, self._key_dim, self._value_dim)
        return kv_cache.update(cache, k, v, cache_update_index)

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        pattern=None,
        query_offset=0,
        score_mods=None,
    ):
        """Attention over projected heads; override this to change the computation.

        Args:
            query: ``(B, Tq, H, D)``; key ``(B, Tk, H, D)``; value ``(B, Tk, H, Dv)``.
            attention_mask: Bool ``(B, 1, Tq, Tk)`` combining the padding masks, the
                explicit `attention_mask` and cache validity, or None. The pattern
                is applied separately.
            pattern: The pattern for this call (the layer's, plus causal if asked).
            query_offset: Absolute position of the first query (the cache index).
            score_mods: The score_mods of this call, if not the layer's.

        Returns:
            ``(output (B, Tq, H, Dv), weights (B, H, Tq, Tk) or None)``.
        """
        pattern = self.pattern if pattern is None else pattern
        components = self.components.replace(
            pattern=pattern, dropout=self._dropout_layer if self.dropout else None
        )
        if score_mods is not None:
            components = components.replace(score_mods=score_mods)
        plan = dispatch.plan(
            components,
            query_length=query.shape[1],
            key_length=key.shape[1],
            head_dim=query.shape[-1],
            value_dim=value.shape[-1],
            return_weights=return_attention_scores,
            training=training,
            block_sparse=self.block_sparse,
            block_size=self.block_size,
            query_offset=query_offset,
            flash_attention=self.flash_attention,
            name=self.name,
        )
        self._record_path(plan.path)
        return dispatch.attend(
            plan, query, key, value, attention_mask, training=training,
            return_weights=return_attention_scores,
        )  # fmt: skip

    def _record_path(self, path):
        if path != self.last_path:
            logger.debug("%s (%s): %s path", self.name, type(self).__name__, path)
        self.last_path = path

    # -- shapes and config ----------------------------------------------------------

    def compute_output_shape(self, query_shape, value_shape=None, key_shape=None):
        output_dim = self.output_shape_ or query_shape[-1]
        return (*query_shape[:-1], output_dim)

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
        output = keras.KerasTensor(self.compute_output_shape(query.shape), dtype=self.compute_dtype)
        result = (output,)
        if return_attention_scores:
            result += (
                keras.KerasTensor(
                    (
                        query.shape[0],
                        self.num_heads,
                        query.shape[1],
                        cache.shape[2] if cache is not None else value.shape[1],
                    ),
                    dtype=self.compute_dtype,
                ),
            )
        if cache is not None:
            result += (keras.KerasTensor(cache.shape, dtype=cache.dtype),)
        return result[0] if len(result) == 1 else result

    @classmethod
    def from_config(cls, config):
        # Every component the config names is checked before any is built: a file that
        # needs missing plugins names all of them at once, in keras_attn's own error
        # (Keras wraps only TypeErrors, under the whole config).
        plugins.check_layer_config(config, owner=f"{cls.__name__} {config.get('name')!r}")
        return super().from_config(config)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "value_dim": self.value_dim,
                "output_shape": self.output_shape_,
                "score": plugins.serialize(self.score),
                "score_mods": [plugins.serialize(m) for m in self.score_mods],
                "pattern": plugins.serialize(self.pattern),
                "normalizer": plugins.serialize(self.normalizer),
                "dropout": self.dropout,
                "use_bias": self.use_bias,
                "block_sparse": self.block_sparse,
                "block_size": self.block_size,
                "flash_attention": self.flash_attention,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "activity_regularizer": keras.regularizers.serialize(self.activity_regularizer),
                "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
                "bias_constraint": keras.constraints.serialize(self.bias_constraint),
                "seed": self.seed,
                "position_encoding": (
                    None
                    if self.position_encoding is None
                    else plugins.serialize(self.position_encoding)
                ),
                "reset_positions": self.reset_positions,
            }
        )
        return config
