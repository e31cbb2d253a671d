"""The attention layers: one engine (`Attention`) and its named presets."""

import logging

import keras
from keras import ops

from keras_attn import engine
from keras_attn import patterns as patterns_module
from keras_attn import plugins
from keras_attn.hookspecs import hookimpl
from keras_attn.positions import make_positions

try:  # Keras keeps masks on tensors; this is how its own layers read them.
    from keras.src.backend import get_keras_mask
    from keras.src.backend import set_keras_mask
except ImportError:  # pragma: no cover

    def get_keras_mask(x):
        return getattr(x, "_keras_mask", None)

    def set_keras_mask(x, mask):
        pass


logger = logging.getLogger("keras_attn")


class _Components:
    """Holds the resolved components until `build` attaches them.

    Keras tracks a sublayer when it is assigned to an attribute. The components are
    attached in `build`, after the projections, so that every layer's weight list
    starts with the query/key/value/output kernels of `keras.layers.MultiHeadAttention`.
    """

    def __init__(self, score, score_mods, pattern, normalizer):
        self.score = score
        self.score_mods = score_mods
        self.pattern = pattern
        self.normalizer = normalizer


def _positive_int_or_none(value, arg):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"`{arg}` must be a positive integer. Received: {arg}={value!r}")


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
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.supports_masking = True
        _positive_int_or_none(num_heads, "num_heads")
        if num_heads is None:
            raise ValueError("`num_heads` must be a positive integer. Received: num_heads=None")
        _positive_int_or_none(key_dim, "key_dim")
        _positive_int_or_none(value_dim, "value_dim")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        if block_sparse not in ("auto", True, False):
            raise ValueError(
                "`block_sparse` must be 'auto', True or False. "
                f"Received: block_sparse={block_sparse!r}"
            )
        _positive_int_or_none(block_size, "block_size")
        if isinstance(output_shape, (list, tuple)):
            if len(output_shape) != 1:
                raise ValueError(
                    "`output_shape` must be an int or a 1-tuple (inputs are (B, T, dim)). "
                    f"Received: output_shape={output_shape}"
                )
            output_shape = output_shape[0]
        _positive_int_or_none(output_shape, "output_shape")
        if isinstance(score_mods, (str, dict)) or plugins.kind_of(score_mods) is not None:
            score_mods = [score_mods]
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
        self._components = _Components(
            score=plugins.resolve("score", score, **layer_defaults),
            score_mods=[plugins.resolve("score_mod", m, **layer_defaults) for m in score_mods],
            pattern=plugins.resolve("pattern", pattern),
            normalizer=plugins.resolve("normalizer", normalizer, **layer_defaults),
        )
        self.last_path = None

    # -- components ---------------------------------------------------------------

    @property
    def score(self):
        return self._components.score

    @property
    def score_mods(self):
        return list(self._components.score_mods)

    @property
    def pattern(self):
        return self._components.pattern

    @property
    def normalizer(self):
        return self._components.normalizer

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
        for i, mod in enumerate(self._components.score_mods):
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
        c = self._components
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

    # -- call -----------------------------------------------------------------------

    def _effective_pattern(self, use_causal_mask):
        pattern = self.pattern
        if not use_causal_mask or pattern.causal:
            return pattern
        if type(pattern) is patterns_module.Full:
            return patterns_module.Causal()
        return pattern & patterns_module.Causal()

    def _check_attention_mask(self, attention_mask, query, key, cache):
        if attention_mask is None:
            return
        shape = tuple(attention_mask.shape)
        key_length = key.shape[1] if cache is None else cache.shape[2]
        expected = (query.shape[1], key_length)
        if len(shape) not in (2, 3) or any(
            a is not None and b is not None and a != b
            for a, b in zip(shape[-2:], expected, strict=True)
        ):
            raise ValueError(
                "`attention_mask` must have shape (B, Tq, Tk) or (Tq, Tk), here "
                f"Tq={expected[0]} and Tk={expected[1]}. "
                f"Received: attention_mask.shape={shape}"
            )

    def _data_mask(self, query_mask, value_mask, key_mask, attention_mask):
        """Padding and explicit masks as one bool ``(B, 1, Tq, Tk)`` tensor, or None."""
        masks = []
        if query_mask is not None:
            masks.append(ops.cast(query_mask, "bool")[:, :, None])  # (B, Tq, 1)
        if value_mask is not None:
            masks.append(ops.cast(value_mask, "bool")[:, None, :])  # (B, 1, Tk)
        if key_mask is not None:
            masks.append(ops.cast(key_mask, "bool")[:, None, :])  # (B, 1, Tk)
        if attention_mask is not None:
            # Its shape was checked by `_check_attention_mask`.
            masks.append(ops.cast(attention_mask, "bool"))
        mask = engine.combine_masks(*masks)
        if mask is None:
            return None
        if len(mask.shape) == 2:
            mask = mask[None]
        return mask[:, None, :, :]  # (B, 1, Tq, Tk)

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
    ):
        if value is None:
            value = query
        if key is None:
            key = value
        self._check_attention_mask(attention_mask, query, key, cache)
        # Masks not passed explicitly come from the inputs' Keras masks.
        if query_mask is None:
            query_mask = get_keras_mask(query)
        if value_mask is None:
            value_mask = get_keras_mask(value)
        if key_mask is None and key is not value:
            key_mask = get_keras_mask(key)
        mask = self._data_mask(query_mask, value_mask, key_mask, attention_mask)
        # The masks are in `mask` now. Take them off the inputs, as Keras's
        # MultiHeadAttention does, so that the projections do not warn about them.
        for tensor in (query, value, key):
            set_keras_mask(tensor, None)

        q = self._query_dense(query)  # (B, Tq, H, D)
        k = self._key_dense(key)  # (B, Tk, H, D)
        gate = self._gate(query)
        v = self._value_dense(value)  # (B, Tk, H, Dv)

        query_offset = 0
        if cache is not None:
            k, v, cache, cache_mask = self._update_cache(k, v, cache, cache_update_index)
            query_offset = cache_update_index
            mask = engine.combine_masks(mask, cache_mask)
        pattern = self._effective_pattern(use_causal_mask)

        output, scores = self._compute_attention(
            q,
            k,
            v,
            mask,
            training,
            return_attention_scores,
            pattern=pattern,
            query_offset=query_offset,
        )
        if gate is not None:
            output = output * gate
        output = self._output_dense(output)  # (B, Tq, E)
        if query_mask is not None:
            set_keras_mask(output, query_mask)
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
        if self._value_dim != self._key_dim:
            raise ValueError(
                "A key/value cache needs key_dim == value_dim. Received: "
                f"key_dim={self._key_dim}, value_dim={self._value_dim}"
            )
        if len(cache.shape) != 5 or cache.shape[1] != 2:
            raise ValueError(
                f"`cache` must have shape (B, 2, S, {self.num_heads}, {self._key_dim}). "
                f"Received: cache.shape={cache.shape}"
            )
        index = ops.cast(cache_update_index, "int32")
        # One update of the whole cache (not a stack of two new halves), which XLA
        # can do in place inside a decoding loop.
        new = ops.stack([k, v], axis=1)  # (B, 2, Tq, H, D)
        cache = ops.slice_update(cache, [0, 0, index, 0, 0], ops.cast(new, cache.dtype))
        key_cache, value_cache = cache[:, 0], cache[:, 1]  # (B, S, H, D)
        # Cache slots past the last written position hold no key yet.
        filled = index + ops.shape(k)[1]
        cache_mask = ops.arange(ops.shape(cache)[2])[None, None, None, :] < filled  # (1, 1, 1, S)
        return key_cache, value_cache, cache, cache_mask

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        positions=None,
        pattern=None,
        query_offset=0,
    ):
        """Attention over projected heads; override this to change the computation.

        Args:
            query: ``(B, Tq, H, D)``; key ``(B, Tk, H, D)``; value ``(B, Tk, H, Dv)``.
            attention_mask: Bool ``(B, 1, Tq, Tk)`` combining the padding masks, the
                explicit `attention_mask` and cache validity, or None. The pattern
                is applied separately.
            positions: `keras_attn.positions.Positions` for the logits, or None to
                make them from the lengths and `query_offset` where a path reads them.
            pattern: The pattern for this call (the layer's, plus causal if asked).
            query_offset: Absolute position of the first query (the cache index).

        Returns:
            ``(output (B, Tq, H, Dv), weights (B, H, Tq, Tk) or None)``.
        """
        pattern = self.pattern if pattern is None else pattern
        dropout_active = bool(self.dropout) and bool(training)
        # keras.ops.dot_product_attention needs one head size for keys and values (the
        # JAX backend checks it), so value_dim != key_dim rules out the fused path.
        unfusable_dims = value.shape[-1] != query.shape[-1]
        path = engine.choose_path(
            self.score,
            self.score_mods,
            pattern,
            self.normalizer,
            query_length=query.shape[1],
            key_length=key.shape[1],
            return_scores=return_attention_scores or unfusable_dims,
            dropout_active=dropout_active,
            block_sparse=self.block_sparse,
            block_size=self.block_size,
            query_offset=query_offset,
            flash_attention=self.flash_attention,
        )
        self._record_path(path)

        def get_positions():
            # Made only where read, so that the fused path's graph is Keras's own.
            if positions is not None:
                return positions
            return make_positions(
                ops.shape(query)[1], ops.shape(key)[1], self.num_heads, query_offset=query_offset
            )

        if path == "fused":
            causal = type(pattern) is patterns_module.Causal
            if causal and not (isinstance(query_offset, int) and query_offset == 0):
                # Absolute positions differ from the kernel's 0-based causal mask.
                attention_mask = engine.combine_masks(attention_mask, pattern.mask(get_positions()))
                causal = False
            output = engine.fused_attention(
                query,
                key,
                value,
                scale=self.score.scale_for(query.shape[-1]),
                causal=causal,
                mask=attention_mask,
                flash_attention=self.flash_attention,
            )
            return output, None
        q = ops.transpose(query, (0, 2, 1, 3))  # (B, H, Tq, D)
        k = ops.transpose(key, (0, 2, 1, 3))  # (B, H, Tk, D)
        v = ops.transpose(value, (0, 2, 1, 3))  # (B, H, Tk, Dv)
        kwargs = dict(
            score=self.score,
            score_mods=self.score_mods,
            pattern=pattern,
            normalizer=self.normalizer,
            positions=get_positions(),
            mask=attention_mask,
            dropout=self._dropout_layer if self.dropout else None,
            training=training,
        )
        if path == "block_sparse":
            from keras_attn import block_sparse

            output, weights = block_sparse.block_sparse_attention(
                q,
                k,
                v,
                block_size=self.block_size,
                return_weights=return_attention_scores,
                query_offset=query_offset,
                **kwargs,
            )
        else:
            output, weights = engine.dense_attention(
                q, k, v, return_weights=return_attention_scores, **kwargs
            )
        output = ops.transpose(output, (0, 2, 1, 3))  # (B, Tq, H, Dv)
        return output, weights if return_attention_scores else None

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
            }
        )
        return config


def _preset_config(config, fixed):
    """Drop the constructor arguments a preset sets itself from a config."""
    return {k: v for k, v in config.items() if k not in fixed}


class SoftAttention(Attention):
    """Soft attention: `Attention` with the ``softmax`` normalizer.

    Args:
        **kwargs: As `Attention`, except `normalizer`.
    """

    name = "soft"

    def __init__(self, num_heads=1, **kwargs):
        kwargs.setdefault("normalizer", "softmax")
        super().__init__(num_heads=num_heads, **kwargs)


class HardAttention(Attention):
    """Hard attention: each query takes the value of its single best allowed key.

    The forward pass puts weight 1.0 on the argmax; gradients flow through the
    softmax (straight-through), so the layer trains.

    Args:
        gumbel: Sample the key with Gumbel noise while training.
        temperature: Temperature of the straight-through softmax.
        **kwargs: As `Attention`, except `normalizer`.
    """

    name = "hard"

    def __init__(self, num_heads=1, gumbel=False, temperature=1.0, **kwargs):
        kwargs.pop("normalizer", None)
        self.gumbel = gumbel
        self.temperature = temperature
        normalizer = {
            "name": "hard",
            "config": {"gumbel": gumbel, "temperature": temperature, "seed": kwargs.get("seed")},
        }
        super().__init__(num_heads=num_heads, normalizer=normalizer, **kwargs)

    def get_config(self):
        config = _preset_config(super().get_config(), {"normalizer"})
        return {**config, "gumbel": self.gumbel, "temperature": self.temperature}


class GlobalAttention(Attention):
    """Global attention: every query attends to every key (the ``full`` pattern).

    Args:
        **kwargs: As `Attention`, except `pattern`.
    """

    name = "global"

    def __init__(self, num_heads=1, **kwargs):
        kwargs.pop("pattern", None)
        super().__init__(num_heads=num_heads, pattern="full", **kwargs)

    def get_config(self):
        return _preset_config(super().get_config(), {"pattern"})


class LocalAttention(Attention):
    """Local (sliding window) attention: query i attends to keys with ``|i - j| < window``.

    Runs on the block-sparse path for long inputs, so cost grows with
    ``T * window`` rather than ``T**2``.

    Args:
        window: Positive integer, the window's half-width plus one (as
            `keras.layers.MultiHeadAttention(sliding_window=...)`).
        causal: Attend only to keys ``i - window < j <= i``.
        **kwargs: As `Attention`, except `pattern`.
    """

    name = "local"

    def __init__(self, window=None, causal=False, num_heads=1, **kwargs):
        kwargs.pop("pattern", None)
        if window is None:
            raise ValueError(
                "LocalAttention needs `window`, a positive integer. Received: window=None"
            )
        pattern = patterns_module.Local(window, causal=causal)
        self.window = window
        self.causal = causal
        super().__init__(num_heads=num_heads, pattern=pattern, **kwargs)

    def get_config(self):
        config = _preset_config(super().get_config(), {"pattern"})
        return {**config, "window": self.window, "causal": self.causal}


class SelfAttention(Attention):
    """Self-attention: queries, keys and values all come from `inputs`.

    Call arguments:
        inputs: ``(B, T, dim)``.
        mask: Bool ``(B, T)`` padding mask (taken from the Keras mask if unset).
        Other arguments as `Attention.call`.
    """

    name = "self"

    def build(self, inputs_shape):
        super().build(inputs_shape, inputs_shape, inputs_shape)

    def call(self, inputs, mask=None, **kwargs):
        if mask is not None:
            kwargs.setdefault("query_mask", mask)
            kwargs.setdefault("value_mask", mask)
        return super().call(inputs, inputs, inputs, **kwargs)

    def compute_output_shape(self, inputs_shape, *args, **kwargs):
        return super().compute_output_shape(inputs_shape)

    def compute_output_spec(self, inputs, mask=None, **kwargs):
        return super().compute_output_spec(inputs, **kwargs)


class CrossAttention(Attention):
    """Cross-attention: queries from `query`, keys and values from `context`.

    Call arguments:
        query: ``(B, Tq, dim)``.
        context: ``(B, Tk, dim_c)``.
        context_mask: Bool ``(B, Tk)`` (taken from the Keras mask if unset).
        Other arguments as `Attention.call`.
    """

    name = "cross"

    def build(self, query_shape, context_shape=None):
        if context_shape is None:
            raise ValueError("CrossAttention needs a `context` input. Received: context=None")
        super().build(query_shape, context_shape, context_shape)

    def call(self, query, context=None, context_mask=None, **kwargs):
        if context is None:
            raise ValueError(
                "CrossAttention needs a `context` tensor (B, Tk, dim). Received: context=None"
            )
        if context_mask is not None:
            kwargs.setdefault("value_mask", context_mask)
        return super().call(query, context, context, **kwargs)

    def compute_output_shape(self, query_shape, context_shape=None, *args, **kwargs):
        return super().compute_output_shape(query_shape)

    def compute_output_spec(self, query, context=None, context_mask=None, **kwargs):
        return super().compute_output_spec(query, context, **kwargs)


class MultiHeadAttention(Attention):
    """Drop-in replacement for `keras.layers.MultiHeadAttention`.

    Same constructor and call arguments, same weights in the same order and shapes:
    ``ours.set_weights(theirs.get_weights())`` gives the same outputs and scores.
    It also accepts every `Attention` argument (score, pattern, normalizer, ...).
    Differences: inputs must be rank 3 (`attention_axes` must be None or the
    sequence axis), and a query row that may attend to no key gets zero weights
    where Keras spreads them uniformly.

    Args:
        num_heads: Number of attention heads.
        key_dim: Size of each head for query and key.
        value_dim: Size of each head for value. Defaults to `key_dim`.
        sliding_window: If set, query i attends to keys with ``|i - j| < sliding_window``.
        use_gate: Gate the attention output with a sigmoid projection of the query.
        attention_axes: None (or ``1``/``(1,)``): attention over the sequence axis.
        **kwargs: As `keras.layers.MultiHeadAttention` and `Attention`.
    """

    name = "multi_head"

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        dropout=0.0,
        use_bias=True,
        output_shape=None,
        attention_axes=None,
        sliding_window=None,
        use_gate=False,
        **kwargs,
    ):
        if attention_axes not in (None, 1, -2, (1,), [1], (-2,), [-2]):
            raise ValueError(
                "keras_attn.MultiHeadAttention attends over the sequence axis of "
                "(B, T, dim) inputs only. Expected attention_axes=None or 1. "
                f"Received: attention_axes={attention_axes}"
            )
        if key_dim is None:
            raise ValueError(
                "`key_dim` is required, as in keras.layers.MultiHeadAttention. Received: key_dim=None"
            )
        if sliding_window is not None:
            _positive_int_or_none(sliding_window, "sliding_window")
            if "pattern" in kwargs:
                raise ValueError("Pass either `sliding_window` or `pattern`, not both.")
            kwargs["pattern"] = patterns_module.Local(sliding_window)
        self.attention_axes = None if attention_axes is None else (1,)
        self.sliding_window = sliding_window
        self.use_gate = use_gate
        super().__init__(
            num_heads=num_heads,
            key_dim=key_dim,
            value_dim=value_dim,
            dropout=dropout,
            use_bias=use_bias,
            output_shape=output_shape,
            **kwargs,
        )

    def _build_extra_projections(self, query_shape):
        # Keras builds the gate between key and value; keep its weight order.
        if self.use_gate:
            self._gate_dense = keras.layers.EinsumDense(
                "abc,cde->abde",
                output_shape=(None, self.num_heads, self._value_dim or self._key_dim),
                bias_axes="de" if self.use_bias else None,
                activation="sigmoid",
                name="gate",
                **self._dense_kwargs(),
            )
            self._gate_dense.build(query_shape)

    def _gate(self, query):
        return self._gate_dense(query) if self.use_gate else None

    def get_config(self):
        config = super().get_config()
        if self.sliding_window is not None:
            config.pop("pattern")
        return {
            **config,
            "attention_axes": self.attention_axes,
            "sliding_window": self.sliding_window,
            "use_gate": self.use_gate,
        }


@hookimpl
def register_layers(register):
    for cls in (
        Attention,
        SoftAttention,
        HardAttention,
        GlobalAttention,
        LocalAttention,
        SelfAttention,
        CrossAttention,
        MultiHeadAttention,
    ):
        register(cls)
