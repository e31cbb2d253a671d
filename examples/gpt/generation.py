"""Decoding for a `build_gpt` model: greedy, temperature and top-k sampling, with or
without a key/value cache.

`Generator(model).generate(prompt, max_new_tokens, ...)` extends int ids ``(B, T)``;
with the cache each block's attention layer keeps the keys and values of the
tokens seen so far in one ``(B, 2, S, H, D)`` tensor, so a new token costs one
position, not the whole prefix. A `Generator` compiles its decoding loop once and
reuses it; `generate` is the one-call form. `generate_text` samples past the
model's trained length in chunks; `generation_speed` times cached against
uncached decoding.

Where every block's attention is a causal sliding window (pattern ``local``: the
blocks add causal), each layer's cache is a ring of `window` slots
(`keras_attn.kv_cache.read_write_ring`): memory proportional to the window, not to
the sequence. A model without learned positions (``position_embedding="none"``,
positions from the attention's rope) then decodes past its `max_length`, in
constant cache memory: the cache index grows, the cache does not.
"""

import time

import keras
import numpy as np
from keras import ops

import keras_attn
from examples.gpt.model import single_document
from keras_attn import kv_cache
from keras_attn import patterns
from keras_attn import validation

SAMPLING = ("greedy", "top_k", "temperature")


class Generator:
    """Decoding for a `GPT` model, with or without a key/value cache.

    The whole decode loop is one compiled call (`keras.ops.while_loop` inside a
    model run with `predict_on_batch`, so tf.function on TensorFlow and jit on
    JAX). With the cache, each iteration runs the blocks on one new token, whose
    attention reads the past keys and values from the cache. Without it, each
    iteration reruns the whole model on a fixed-size buffer of the sequence and
    reads the logits at the current position (causal attention makes the empty
    positions after it irrelevant).

    Sampling draws Gumbel noise on the host (from `seed`) and takes
    ``argmax(logits / temperature + noise)`` over the `top_k` best tokens, which
    samples from ``softmax(logits / temperature)``; greedy uses no noise.

    Attributes:
        ring_windows: The window of every block's attention where each is a causal
            sliding window (its cache is then a ring of that many slots), else None.
        unbounded: Whether `generate` may go past the model's `max_length`: the
            model has no learned positions and `ring_windows` is not None.
    """

    def __init__(self, model):
        self.model = model
        self.embedding, self.blocks = model.embedding, model.blocks
        self.final_norm, self.head = model.final_norm, model.head
        self.max_length = model.max_length
        self.vocab_size = model.vocab_size
        # keras.layers.MultiHeadAttention (the reference) has no key/value cache.
        self.supports_cache = all(
            isinstance(b.attention, keras_attn.Attention) for b in self.blocks
        )
        windows = [_ring_window(b.attention) for b in self.blocks]
        self.ring_windows = None if None in windows else tuple(windows)
        self.position_embedding = getattr(model, "position_embedding", "learned")
        self.unbounded = self.ring_windows is not None and self.position_embedding == "none"
        self._decoders = {}

    def _why_bounded(self):
        """Why this model cannot decode past `max_length` (for the error)."""
        reasons = []
        if self.position_embedding != "none":
            reasons.append(
                f"its position embedding is {self.position_embedding!r} ({self.max_length} "
                "learned positions)"
            )
        if self.ring_windows is None:
            names = [
                type(b.attention).__name__
                if not isinstance(b.attention, keras_attn.Attention)
                else keras_attn.plugins.registry_name(b.attention.pattern)
                for b in self.blocks
                if _ring_window(b.attention) is None
            ]
            reasons.append(f"not every block's attention is a causal sliding window ({names})")
        return " and ".join(reasons)

    def _check_length(self, prompt, max_new_tokens):
        if prompt.ndim != 2 or prompt.shape[1] == 0:
            raise ValueError(
                f"`prompt` must be int ids (B, T) with T >= 1. Received: prompt.shape={prompt.shape}"
            )
        validation.positive_int(max_new_tokens, "max_new_tokens")
        if prompt.shape[1] + max_new_tokens > self.max_length and not self.unbounded:
            raise ValueError(
                f"The prompt plus the new tokens is longer than the model's maximum "
                f"length {self.max_length}. Decoding past it needs a model without learned "
                "positions (build_gpt(..., position_embedding='none'), positions from the "
                "attention's rope) whose every block attends through a causal sliding "
                "window (pattern 'local'; its cache is a ring of `window` slots), but "
                f"{self._why_bounded()}. Received: prompt length={prompt.shape[1]}, "
                f"max_new_tokens={max_new_tokens}"
            )

    def generate(
        self,
        prompt,
        max_new_tokens,
        sampling="greedy",
        temperature=1.0,
        top_k=None,
        seed=None,
        use_cache=True,
    ):
        """Extend `prompt` (int ``(B, T)``) by `max_new_tokens` tokens; returns ``(B, T + N)``.

        Args:
            sampling: ``"greedy"`` (argmax), ``"temperature"`` (sample from
                softmax(logits / temperature)) or ``"top_k"`` (the same, among the
                `top_k` most likely tokens).
            seed: Seed of the sampling noise (same seed, same tokens).
            use_cache: Decode with the key/value cache (default) or rerun the
                model over the whole sequence for every token.
        """
        prompt = np.asarray(prompt, dtype="int32")
        if prompt.ndim == 1:
            prompt = prompt[None]
        if sampling not in SAMPLING:
            raise ValueError(
                f"`sampling` must be one of {SAMPLING}. Received: sampling={sampling!r}"
            )
        if sampling == "top_k" and (not isinstance(top_k, int) or top_k <= 0):
            raise ValueError(f"top_k sampling needs a positive `top_k`. Received: top_k={top_k!r}")
        if temperature <= 0:
            raise ValueError(f"`temperature` must be positive. Received: temperature={temperature}")
        self._check_length(prompt, max_new_tokens)
        if use_cache and not self.supports_cache:
            raise ValueError(
                "keras.layers.MultiHeadAttention has no key/value cache; pass use_cache=False."
            )
        batch = prompt.shape[0]
        if sampling == "greedy":
            noise = np.zeros((batch, max_new_tokens, self.vocab_size), "float32")
            temperature, top_k = 1.0, self.vocab_size
        else:
            uniform = np.random.default_rng(seed).uniform(
                1e-12, 1.0, (batch, max_new_tokens, self.vocab_size)
            )
            noise = (-np.log(-np.log(uniform))).astype("float32")  # Gumbel(0, 1)
            top_k = min(top_k or self.vocab_size, self.vocab_size)
        decoder = self._decoders.get(use_cache)
        if decoder is None:
            decoder = _Decoder(self, use_cache)
            # XLA on TensorFlow too: without it, the per-op overhead of the
            # tf.function while loop dominates a cached step (1.5 s vs 0.6 s for 256
            # tokens of a 4-layer width-256 model on 2 CPU cores).
            decoder.compile(jit_compile=keras.backend.backend() in ("tensorflow", "jax"))
            self._decoders[use_cache] = decoder
        new = decoder.predict_on_batch(
            [
                prompt,
                noise,
                np.full((batch,), temperature, "float32"),
                np.full((batch,), top_k, "int32"),
            ]
        )
        return np.concatenate([prompt, np.asarray(new, "int32")], axis=1)

    def generate_text(self, prompt, length, window=None, seed=None, **kwargs):
        """Generate `length` tokens after `prompt`, sliding past the trained length.

        Positions past the training windows (`window`, the ``--seq-len`` trained on)
        have untrained embeddings, so long samples go in chunks: each chunk continues
        from the last ``window // 2`` tokens so far, with the key/value cache inside it.
        A model that decodes past its length (`unbounded`: no learned positions, a
        causal sliding window in every block) needs no chunks: one `generate` call.
        Other arguments as `generate`.

        Returns:
            Int ``(B, T + length)``.

        Raises:
            ValueError: the prompt is not shorter than the window.
        """
        ids = np.asarray(prompt, "int32")
        ids = ids[None] if ids.ndim == 1 else ids
        if self.unbounded:
            return self.generate(ids, length, seed=seed, **kwargs)
        window = min(window or self.max_length, self.max_length)
        if ids.shape[1] >= window:
            raise ValueError(
                f"The prompt must be shorter than the window of {window} tokens. "
                f"Received: prompt length={ids.shape[1]}"
            )
        target = ids.shape[1] + length
        chunk = 0
        while ids.shape[1] < target:
            context = ids if chunk == 0 else ids[:, -(window // 2) :]
            new = window - context.shape[1]  # same shapes from the second chunk on: one compile
            chunk_seed = None if seed is None else seed + chunk
            out = self.generate(context, new, seed=chunk_seed, **kwargs)
            ids = np.concatenate([ids, out[:, context.shape[1] :]], axis=1)
            chunk += 1
        return ids[:, :target]


class _Decoder(keras.Model):
    """The decode loop of a GPT as a model: ``[prompt (B, T), noise (B, N, V),
    temperature (B,), top_k (B,)] -> new tokens (B, N)``.

    A subclassed model, not a functional one: Keras' functional graphs require a
    layer to return the same number of outputs on every call, and the blocks
    return their cache only here.

    Attributes:
        cache_shapes: The shapes of the caches the last traced call made (cached
            decoding), ``(B, 2, S, H, D)`` per block: ``S`` is the window of a ring.
    """

    def __init__(self, generator, use_cache):
        # float32 whatever the global policy: the noise and temperature it takes
        # are sampling inputs, which a mixed policy would cast to float16 (the
        # blocks keep their own policies).
        super().__init__(name="gpt_cached_decoder" if use_cache else "gpt_decoder", dtype="float32")
        self.gpt = generator.model
        self.embedding = generator.embedding
        self.blocks = generator.blocks
        self.final_norm = generator.final_norm
        self.head = generator.head
        self.use_cache = use_cache
        self.ring_windows = generator.ring_windows
        self.cache_shapes = None

    def _step(self, token_ids, index, caches):
        """Logits of the last position ``(B, V)`` and the new caches."""
        x = self.embedding(token_ids, start_index=index)  # (B, T, E)
        new_caches = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, cache = block(x, cache=cache, cache_update_index=index)  # (B, 2, S, H, D)
            new_caches.append(cache)
        return self.head(self.final_norm(x[:, -1:, :]))[:, 0], new_caches

    def call(self, inputs):
        prompt, noise, temperature, top_k = inputs
        # Dynamic sizes: TensorFlow may trace with unknown lengths.
        batch, prompt_length = ops.shape(prompt)[0], ops.shape(prompt)[1]
        new_tokens = ops.shape(noise)[1]
        total = prompt_length + new_tokens

        def pick(logits, i):
            logits = ops.cast(logits, "float32") / temperature[:, None]
            vocab = ops.shape(logits)[-1]
            kth = ops.take_along_axis(
                ops.sort(logits, axis=-1), (vocab - top_k)[:, None], axis=-1
            )  # (B, 1): the k-th largest logit
            logits = ops.where(logits >= kth, logits, -1e9)
            return ops.cast(ops.argmax(logits + noise[:, i], axis=-1), "int32")  # (B,)

        out = ops.zeros((batch, new_tokens), "int32")
        if self.use_cache:
            # A causal sliding window keeps a ring of `window` slots: a fixed shape
            # whatever the length (only the cache index grows); else `total` slots.
            slots = self.ring_windows or [total] * len(self.blocks)
            caches = [
                ops.zeros(b.attention.cache_shape(batch, s), dtype=b.attention.compute_dtype)
                for b, s in zip(self.blocks, slots, strict=True)
            ]
            self.cache_shapes = [tuple(c.shape) for c in caches]  # of the last trace
            logits, caches = self._step(prompt, 0, caches)  # prefill with the prompt
            token = pick(logits, 0)

            def body(i, token, out, *caches):
                out = ops.slice_update(out, [0, i], token[:, None])
                logits, caches = self._step(token[:, None], prompt_length + i, caches)
                return (i + 1, pick(logits, ops.minimum(i + 1, new_tokens - 1)), out, *caches)

            loop_vars = (ops.convert_to_tensor(0, "int32"), token, out, *caches)
        else:
            buffer = ops.concatenate([prompt, out], axis=1)  # (B, S)

            def body(i, token, buffer):
                # One document per row: a packed model gets all-zero segment ids.
                logits = self.gpt(single_document(self.gpt, buffer))  # (B, S, V); after i: ignored
                position = prompt_length + i
                token = pick(ops.take(logits, position - 1, axis=1), i)
                buffer = ops.slice_update(buffer, [0, position], token[:, None])
                return i + 1, token, buffer

            loop_vars = (ops.convert_to_tensor(0, "int32"), ops.zeros((batch,), "int32"), buffer)

        def cond(i, *_):
            return i < new_tokens

        result = ops.while_loop(cond, body, loop_vars)
        return result[2] if self.use_cache else result[2][:, prompt_length:]


def _ring_window(layer):
    """The window of a block's attention if it is a causal sliding window (the blocks
    call it with ``use_causal_mask=True``), else None."""
    if not isinstance(layer, keras_attn.Attention):
        return None
    return kv_cache.ring_window(patterns.with_causal(layer.pattern))


def generate(model, prompt, max_new_tokens, **kwargs):
    """`Generator(model).generate(...)`: one call, compiled for it (a `Generator`
    kept across calls compiles its decoding loop once)."""
    return Generator(model).generate(prompt, max_new_tokens, **kwargs)


def generate_text(model, prompt, length, window=None, seed=None, **kwargs):
    """`Generator(model).generate_text(...)`: one call, compiled for it."""
    return Generator(model).generate_text(prompt, length, window=window, seed=seed, **kwargs)


def generation_speed(model, prompt, new_tokens):
    """Seconds for cached and uncached greedy decoding of `new_tokens` (after a warm-up
    run of each with the same shapes, so compiling is not timed), and whether they
    produced the same tokens."""
    generator = Generator(model)
    new_tokens = min(new_tokens, generator.max_length - prompt.shape[1])
    for use_cache in (True, False):
        generator.generate(prompt, new_tokens, use_cache=use_cache)  # compile for these shapes
    start = time.perf_counter()
    cached = generator.generate(prompt, new_tokens, use_cache=True)
    cached_s = time.perf_counter() - start
    start = time.perf_counter()
    uncached = generator.generate(prompt, new_tokens, use_cache=False)
    uncached_s = time.perf_counter() - start
    return {
        "new_tokens": new_tokens,
        "cached_s": cached_s,
        "uncached_s": uncached_s,
        "speedup": uncached_s / cached_s,
        "same_tokens": bool((cached == uncached).all()),
    }
