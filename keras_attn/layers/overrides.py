"""Keras's override contract for attention layers, in one place.

`keras.layers.MultiHeadAttention` documents two methods for subclasses to override:
`_compute_attention` (the attention over projected heads) and `_masked_softmax`
(scores to weights). KerasHub's and users' subclasses override them and call
``super()``. `KerasOverrides` gives keras_attn's layers the same contract: a layer's
`call` hands its heads to `_attention`, which runs the engine directly unless a
subclass overrides one of these, and then calls the override as Keras would, with
one complete mask.

Keras's semantics are kept: the mask `_compute_attention` receives is complete (the
padding, the explicit mask, the cache's written slots, the segments, the layer's
pattern and the causal mask, at the queries' absolute positions), so a
``super()._compute_attention`` applies only what its own `use_causal_mask` adds.
"""

from keras import ops

from keras_attn import dispatch
from keras_attn import masks
from keras_attn import patterns
from keras_attn.positions import make_positions

__all__ = ["KerasOverrides"]


def _complete_mask(heads, pattern, num_heads):
    """The heads' data mask with segments and the pattern, in Keras's form (`masks.keras_form`)."""
    mask = heads.mask
    if heads.segments is not None:
        mask = masks.combine_masks(mask, heads.segments.mask)
    if len(heads.query.shape) > 4:
        if pattern.kernel_form != "full":
            raise ValueError(
                "A subclass that overrides `_compute_attention` or `_masked_softmax` gets "
                "patterns and causal masks of (B, T, dim) inputs only. Received: "
                f"query heads of shape {tuple(heads.query.shape)}"
            )
        return mask
    positions = make_positions(
        ops.shape(heads.query)[1],
        ops.shape(heads.key)[1],
        num_heads,
        query_offset=heads.query_offset,
    )
    mask = masks.combine_masks(mask, masks.pattern_mask_or_none(pattern, positions))
    return masks.keras_form(mask)


class KerasOverrides:
    """Mixin: `_compute_attention` and `_masked_softmax` as Keras's layers offer them.

    The class it is mixed into provides ``_engine(heads, pattern, training,
    return_weights)`` (the attention on `keras_attn.dispatch.Heads`), `components`,
    `num_heads`, ``_dropout_layer`` and ``_record_path``.
    """

    def _overrides(self, name):
        """Whether a class outside keras_attn (a user's, KerasHub's) defines Keras's method `name`."""
        for klass in type(self).__mro__:
            if name in vars(klass):
                return not klass.__module__.startswith("keras_attn.")
        return False

    def _attention(self, heads, pattern, training, return_weights):
        """Run the attention on `heads` with `pattern`, through a subclass's override if any.

        Returns:
            ``(output (B, Tq, H, Dv), weights (B, H, Tq, Tk) or None)``.
        """
        if self._overrides("_compute_attention"):
            mask = _complete_mask(heads, pattern, self.num_heads)
            return self._invoke_compute_attention(
                heads.query, heads.key, heads.value, mask, training, return_weights
            )
        if self._overrides("_masked_softmax"):
            mask = _complete_mask(heads, pattern, self.num_heads)
            return self._attend_with_masked_softmax(
                heads._replace(mask=mask), training, return_weights
            )
        return self._engine(heads, pattern, training, return_weights)

    def _invoke_compute_attention(self, q, k, v, mask, training, return_attention_scores):
        # Keras's MultiHeadAttention passes these positionally.
        return self._compute_attention(q, k, v, mask, training, return_attention_scores)

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        use_causal_mask=False,
    ):
        """Attention over projected heads, as in Keras; override it to change the computation.

        Args:
            query: ``(B, Tq, H, D)``; key ``(B, Tk, H, D)``; value ``(B, Tk, H, Dv)``
                (key/value heads already repeated to `num_heads`).
            attention_mask: Bool (or 0/1) mask broadcastable to ``(B, Tq, Tk)``, or
                ``(B, H, Tq, Tk)`` per head, or None. A rank-3 mask is never read as
                per-head. As in Keras it is complete: when the layer's `call` calls
                this, the layer's pattern and causal mask are already in it.
            training: Whether dropout is active.
            return_attention_scores: Whether to return the weights.
            use_causal_mask: Also apply a causal mask.

        Returns:
            ``(output (B, Tq, H, Dv), weights (B, H, Tq, Tk) or None)``.
        """
        self._check_flash_attention(return_attention_scores)
        pattern = patterns.Causal() if use_causal_mask else patterns.Full()
        heads = dispatch.Heads(query, key, value, masks.heads_mask(attention_mask))
        if self._overrides("_masked_softmax"):
            mask = _complete_mask(heads, pattern, self.num_heads)
            return self._attend_with_masked_softmax(
                heads._replace(mask=mask), training, return_attention_scores
            )
        return self._engine(heads, pattern, training, return_attention_scores)

    def _masked_softmax(self, attention_scores, attention_mask=None):
        """The layer's normalizer over the keys a mask allows (Keras's override point).

        Args:
            attention_scores: Logits ``(B, H, Tq, Tk)``.
            attention_mask: Broadcastable to ``(B, Tq, Tk)`` (expanded at the head
                axis, as Keras does) or ``(B, H, Tq, Tk)``, or None.
        """
        mask = masks.heads_mask(attention_mask)
        return self.components.normalizer(attention_scores, mask=mask)

    def _attend_with_masked_softmax(self, heads, training, return_weights):
        """Scores, score_mods, a subclass's `_masked_softmax`, dropout and the weighted sum.

        `heads.mask` is complete, in Keras's form (`_complete_mask`).
        """
        q = ops.transpose(heads.query, (0, 2, 1, 3))  # (B, H, Tq, D)
        k = ops.transpose(heads.key, (0, 2, 1, 3))  # (B, H, Tk, D)
        v = ops.transpose(heads.value, (0, 2, 1, 3))  # (B, H, Tk, Dv)
        positions = make_positions(
            ops.shape(q)[2], ops.shape(k)[2], self.num_heads, query_offset=heads.query_offset
        )
        logits = self.components.score(q, k)
        for mod in self.components.score_mods:
            logits = mod(logits, positions=positions)
        weights = self._masked_softmax(logits, heads.mask)
        dropped = self._dropout_layer(weights, training=training) if self.dropout else weights
        output = ops.matmul(ops.cast(dropped, v.dtype), v)  # (B, H, Tq, Dv)
        self._record_path("dense")
        return ops.transpose(output, (0, 2, 1, 3)), weights if return_weights else None
