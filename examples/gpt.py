"""GPT: a decoder-only language model assembled from keras_attn layers.

    python -m examples.gpt demo                      # a few minutes on CPU, embedded text
    python -m examples.gpt train --dataset tiny_shakespeare --epochs 10 --output runs/gpt
    python -m examples.gpt train --pattern '{"name": "local", "config": {"window": 32}}'
    python -m examples.gpt generate --output runs/gpt --prompt "The " --top-k 5
    python -m examples.gpt compare                   # keras_attn vs keras.layers.MultiHeadAttention

The model reads top to bottom: `TokenAndPositionEmbedding`, then `DecoderBlock`s
(pre-norm causal self-attention and an MLP, each with a residual connection),
then `build_gpt`, which stacks them into a functional `keras.Model` mapping token
ids ``(B, T)`` to next-token logits ``(B, T, vocab_size)``. `generate` decodes
with a key/value cache held by the attention layers (one ``(B, 2, S, H, D)``
tensor per block), so each new token costs one position, not the whole prefix.

The attention of every block is configurable (`attention=` of `build_gpt`, the
``--layer/--score/--pattern/--normalizer/--score-mod`` flags): the blocks always
call it with ``use_causal_mask=True``, so any pattern is intersected with causal.
"""

import json
import os
import statistics
import sys
import time

import keras
import numpy as np
from keras import ops

import keras_attn
from examples import datasets
from examples import text as text_lib
from examples import training

DATASETS = ("pydoc_text", "tiny_shakespeare")
SAMPLING = ("greedy", "top_k", "temperature")


# -- blocks --------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="examples.gpt")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Token embedding plus a learned absolute position embedding.

    Args:
        vocab_size: Number of token ids.
        max_length: Longest sequence the model accepts (number of positions).
        hidden_dim: Embedding size.

    Call arguments:
        token_ids: Int ``(B, T)``.
        start_index: Position of the first token (int or scalar tensor); a
            decoding step with a cache starts past the tokens already seen.

    Returns:
        ``(B, T, hidden_dim)``.
    """

    def __init__(self, vocab_size, max_length, hidden_dim, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.hidden_dim = hidden_dim

    def build(self, input_shape):
        self.token_embedding = keras.layers.Embedding(
            self.vocab_size, self.hidden_dim, dtype=self.dtype_policy, name="token_embedding"
        )
        self.token_embedding.build(input_shape)
        self.position_embedding = keras.layers.Embedding(
            self.max_length, self.hidden_dim, dtype=self.dtype_policy, name="position_embedding"
        )
        self.position_embedding.build((None,))

    def call(self, token_ids, start_index=0):
        length = token_ids.shape[1]
        if (
            length is not None
            and isinstance(start_index, int)
            and start_index + length > self.max_length
        ):
            raise ValueError(
                f"The sequence is longer than the model's maximum length {self.max_length}. "
                f"Received: sequence length={start_index + length}"
            )
        positions = ops.arange(ops.shape(token_ids)[1], dtype="int32") + ops.cast(
            start_index, "int32"
        )
        return (
            self.token_embedding(token_ids) + self.position_embedding(positions)[None]
        )  # (B, T, E)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            vocab_size=self.vocab_size, max_length=self.max_length, hidden_dim=self.hidden_dim
        )
        return config


@keras.saving.register_keras_serializable(package="examples.gpt")
class DecoderBlock(keras.layers.Layer):
    """Pre-norm decoder block: causal self-attention, then an MLP, both residual.

    Args:
        num_heads: Attention heads.
        intermediate_dim: Width of the MLP.
        attention: The ``attention`` dict (see `examples.training.attention_layer`).
        dropout: Dropout after attention and MLP (and on the attention weights).
        layer_norm_epsilon: Epsilon of the layer norms.

    Call arguments:
        x: ``(B, T, E)``.
        cache: Optional ``(B, 2, S, H, E // H)`` key/value cache of this block.
        cache_update_index: Position of ``x[:, 0]`` in the cache.
        return_attention_scores: Also return the weights ``(B, H, T, S)``.

    Returns:
        ``(B, T, E)``; then the weights if asked; then the new cache if given one.
    """

    def __init__(
        self,
        num_heads,
        intermediate_dim,
        attention=None,
        dropout=0.0,
        layer_norm_epsilon=1e-5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.attention_config = training.check_attention(attention)
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        if hidden_dim % self.num_heads:
            raise ValueError(
                "hidden_dim must be divisible by num_heads. "
                f"Received: hidden_dim={hidden_dim}, num_heads={self.num_heads}"
            )
        dtype = self.dtype_policy
        eps = self.layer_norm_epsilon
        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=eps, dtype=dtype, name="attention_norm"
        )
        self.attention_norm.build(input_shape)
        self.attention = training.attention_layer(
            self.attention_config,
            self.num_heads,
            hidden_dim // self.num_heads,
            dropout=self.dropout,
            name="attention",
            dtype=dtype,
        )
        self.attention.build(input_shape, input_shape)
        self.attention_dropout = keras.layers.Dropout(self.dropout, dtype=dtype)
        self.mlp_norm = keras.layers.LayerNormalization(epsilon=eps, dtype=dtype, name="mlp_norm")
        self.mlp_norm.build(input_shape)
        self.mlp_in = keras.layers.Dense(
            self.intermediate_dim, activation="gelu", dtype=dtype, name="mlp_in"
        )
        self.mlp_in.build(input_shape)
        self.mlp_out = keras.layers.Dense(hidden_dim, dtype=dtype, name="mlp_out")
        self.mlp_out.build((*input_shape[:-1], self.intermediate_dim))
        self.mlp_dropout = keras.layers.Dropout(self.dropout, dtype=dtype)

    def call(
        self, x, cache=None, cache_update_index=None, return_attention_scores=False, training=None
    ):
        h = self.attention_norm(x)
        kwargs = dict(use_causal_mask=True, training=training)
        if return_attention_scores:
            kwargs["return_attention_scores"] = True
        if cache is not None:
            kwargs.update(cache=cache, cache_update_index=cache_update_index)
        outputs = self.attention(h, h, **kwargs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        x = x + self.attention_dropout(outputs[0], training=training)
        x = x + self.mlp_dropout(self.mlp_out(self.mlp_in(self.mlp_norm(x))), training=training)
        return x if len(outputs) == 1 else (x, *outputs[1:])

    def compute_output_spec(
        self, x, cache=None, cache_update_index=None, return_attention_scores=False, training=None
    ):
        result = (keras.KerasTensor(x.shape, dtype=self.compute_dtype),)
        if return_attention_scores:
            key_length = cache.shape[2] if cache is not None else x.shape[1]
            result += (keras.KerasTensor((x.shape[0], self.num_heads, x.shape[1], key_length)),)
        if cache is not None:
            result += (keras.KerasTensor(cache.shape, dtype=cache.dtype),)
        return result[0] if len(result) == 1 else result

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            intermediate_dim=self.intermediate_dim,
            attention=self.attention_config,
            dropout=self.dropout,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config


# -- model ---------------------------------------------------------------------------


def build_gpt(
    vocab_size,
    max_length,
    num_layers=4,
    num_heads=4,
    hidden_dim=128,
    intermediate_dim=None,
    dropout=0.0,
    attention=None,
    name="gpt",
):
    """A GPT decoder as a functional `keras.Model`: token ids ``(B, T)`` to logits ``(B, T, V)``.

    Args:
        vocab_size: Number of token ids.
        max_length: Longest sequence (prompt plus generated tokens) it accepts.
        num_layers: Number of `DecoderBlock`s.
        num_heads: Attention heads per block.
        hidden_dim: Model width (divisible by `num_heads`).
        intermediate_dim: MLP width (default ``4 * hidden_dim``).
        dropout: Dropout rate.
        attention: Dict with any of ``layer``, ``score``, ``pattern``,
            ``normalizer``, ``score_mods``: the attention of every block, from
            the registries (plugins' included). ``layer="keras"`` builds the
            reference with `keras.layers.MultiHeadAttention`.

    The logits are float32 under mixed precision, for a stable loss.
    """
    for arg, value in (
        ("vocab_size", vocab_size),
        ("max_length", max_length),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("hidden_dim", hidden_dim),
    ):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{arg}` must be a positive integer. Received: {arg}={value!r}")
    if hidden_dim % num_heads:
        raise ValueError(
            "`hidden_dim` must be divisible by `num_heads`. "
            f"Received: hidden_dim={hidden_dim}, num_heads={num_heads}"
        )
    attention = training.check_attention(attention)
    intermediate_dim = intermediate_dim or 4 * hidden_dim

    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    x = TokenAndPositionEmbedding(vocab_size, max_length, hidden_dim, name="embedding")(token_ids)
    for i in range(num_layers):
        x = DecoderBlock(
            num_heads, intermediate_dim, attention=attention, dropout=dropout, name=f"block_{i}"
        )(x)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = keras.layers.Dense(vocab_size, dtype="float32", name="logits")(x)
    return keras.Model(token_ids, logits, name=name)


def compile_gpt(model, learning_rate=1e-3):
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=0.01, global_clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def _parts(model):
    """The layers of a `build_gpt` model, by role."""
    blocks = sorted(
        (layer for layer in model.layers if isinstance(layer, DecoderBlock)),
        key=lambda layer: int(layer.name.rsplit("_", 1)[1]),
    )
    return (
        model.get_layer("embedding"),
        blocks,
        model.get_layer("final_norm"),
        model.get_layer("logits"),
    )


def attention_weights(model, token_ids):
    """The causal attention weights of every block on `token_ids`: ``{name: (B, H, T, T)}``."""
    embedding, blocks, _, _ = _parts(model)
    x = embedding(ops.convert_to_tensor(token_ids, "int32"))
    maps = {}
    for block in blocks:
        x, weights = block(x, return_attention_scores=True, training=False)
        maps[block.name] = ops.convert_to_numpy(weights).astype("float32")
    return maps


# -- generation ----------------------------------------------------------------------


class Generator:
    """Decoding for a `build_gpt` model, with or without a key/value cache.

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
    """

    def __init__(self, model):
        self.model = model
        self.embedding, self.blocks, self.final_norm, self.head = _parts(model)
        self.max_length = self.embedding.max_length
        self.vocab_size = self.embedding.vocab_size
        # keras.layers.MultiHeadAttention (the reference) has no key/value cache.
        self.supports_cache = all(
            isinstance(b.attention, keras_attn.Attention) for b in self.blocks
        )
        self._decoders = {}

    def _check_length(self, prompt, max_new_tokens):
        if prompt.ndim != 2 or prompt.shape[1] == 0:
            raise ValueError(
                f"`prompt` must be int ids (B, T) with T >= 1. Received: prompt.shape={prompt.shape}"
            )
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(
                f"`max_new_tokens` must be a positive integer. Received: {max_new_tokens!r}"
            )
        if prompt.shape[1] + max_new_tokens > self.max_length:
            raise ValueError(
                f"The prompt plus the new tokens is longer than the model's maximum "
                f"length {self.max_length}. Received: prompt length={prompt.shape[1]}, "
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


class _Decoder(keras.Model):
    """The decode loop of a GPT as a model: ``[prompt (B, T), noise (B, N, V),
    temperature (B,), top_k (B,)] -> new tokens (B, N)``.

    A subclassed model, not a functional one: Keras' functional graphs require a
    layer to return the same number of outputs on every call, and the blocks
    return their cache only here.
    """

    def __init__(self, generator, use_cache):
        super().__init__(name="gpt_cached_decoder" if use_cache else "gpt_decoder")
        self.gpt = generator.model
        self.embedding = generator.embedding
        self.blocks = generator.blocks
        self.final_norm = generator.final_norm
        self.head = generator.head
        self.use_cache = use_cache

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
            caches = [
                ops.zeros(
                    (batch, 2, total, b.num_heads, b.attention._key_dim),
                    dtype=b.attention.compute_dtype,
                )
                for b in self.blocks
            ]
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
                logits = self.gpt(buffer)  # (B, S, V); positions after i are ignored
                position = prompt_length + i
                token = pick(ops.take(logits, position - 1, axis=1), i)
                buffer = ops.slice_update(buffer, [0, position], token[:, None])
                return i + 1, token, buffer

            loop_vars = (ops.convert_to_tensor(0, "int32"), ops.zeros((batch,), "int32"), buffer)

        def cond(i, *_):
            return i < new_tokens

        result = ops.while_loop(cond, body, loop_vars)
        return result[2] if self.use_cache else result[2][:, prompt_length:]


def generate(model, prompt, max_new_tokens, **kwargs):
    """`Generator(model).generate(...)`, reusing the compiled decoder across calls."""
    generator = getattr(model, "_gpt_generator", None)
    if generator is None:
        generator = Generator(model)
        model._gpt_generator = generator
    return generator.generate(prompt, max_new_tokens, **kwargs)


def generate_text(model, prompt, length, window=None, seed=None, **kwargs):
    """Generate `length` tokens after `prompt`, sliding past the trained length.

    Positions past the training windows (`window`, the ``--seq-len`` trained on)
    have untrained embeddings, so long samples go in chunks: each chunk continues
    from the last ``window // 2`` tokens so far, with the key/value cache inside it.

    Returns:
        Int ``(B, T + length)``.
    """
    max_length = _parts(model)[0].max_length
    window = min(window or max_length, max_length)
    ids = np.asarray(prompt, "int32")
    ids = ids[None] if ids.ndim == 1 else ids
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
        out = generate(model, context, new, seed=chunk_seed, **kwargs)
        ids = np.concatenate([ids, out[:, context.shape[1] :]], axis=1)
        chunk += 1
    return ids[:, :target]


# -- data ----------------------------------------------------------------------------


def load_text(args, split):
    ds = datasets.load(
        args.dataset, split, data_dir=args.data_dir, download=args.download, allowed=DATASETS
    )
    return "\n\n".join(text_lib.read_texts(ds))


# -- commands ------------------------------------------------------------------------

MODEL_FLAGS = ("max_length", "seq_len", "num_layers", "num_heads", "hidden_dim", "dropout")


def _add_model_arguments(parser, **defaults):
    g = parser.add_argument_group("model")
    g.add_argument(
        "--seq-len", type=int, default=defaults.get("seq_len", 128), help="training window"
    )
    g.add_argument(
        "--max-length",
        type=int,
        default=defaults.get("max_length"),
        help="positions of the model (default: --seq-len)",
    )
    g.add_argument("--num-layers", type=int, default=defaults.get("num_layers", 4))
    g.add_argument("--num-heads", type=int, default=defaults.get("num_heads", 4))
    g.add_argument("--hidden-dim", type=int, default=defaults.get("hidden_dim", 128))
    g.add_argument("--dropout", type=float, default=defaults.get("dropout", 0.0))
    g.add_argument(
        "--sample-length",
        type=int,
        default=defaults.get("sample_length", 200),
        help="characters to generate after training (0: none)",
    )
    g.add_argument("--prompt", default=defaults.get("prompt", "The "))


def _check_args(args):
    if args.max_length is None:
        args.max_length = args.seq_len
    if args.seq_len > args.max_length:
        raise ValueError(
            f"--seq-len is longer than the model's maximum length --max-length={args.max_length}. "
            f"Received: seq_len={args.seq_len}"
        )
    for arg in ("epochs", "batch_size", "seq_len", "num_layers", "num_heads", "hidden_dim"):
        if getattr(args, arg) <= 0:
            raise ValueError(
                f"--{arg.replace('_', '-')} must be positive. Received: {arg}={getattr(args, arg)}"
            )


class TextData:
    """A dataset's text as token ids, with the tokenizer built from its training split."""

    def __init__(self, args):
        train_text, eval_text = load_text(args, "train"), load_text(args, "test")
        self.tokenizer = text_lib.CharTokenizer.from_texts([train_text])
        self.train_ids = self.tokenizer.encode(train_text)
        self.eval_ids = self.tokenizer.encode(eval_text)
        self.baseline = text_lib.unigram_entropy(self.train_ids, self.tokenizer.vocab_size)

    def datasets(self, args):
        """``(train, eval)`` `tf.data` pipelines of next-token windows."""
        train = text_lib.lm_dataset(
            self.train_ids,
            args.seq_len,
            args.batch_size,
            seed=args.seed,
            repeat=args.steps is not None,
        )
        evaluation = text_lib.lm_dataset(
            self.eval_ids, args.seq_len, args.batch_size, shuffle=False
        )
        return train, evaluation


def _new_model(args, vocab_size, attention):
    model = build_gpt(
        vocab_size,
        args.max_length,
        args.num_layers,
        args.num_heads,
        args.hidden_dim,
        dropout=args.dropout,
        attention=attention,
    )
    return compile_gpt(model, args.learning_rate)


def train(args):
    """Train (or resume) a GPT; write checkpoints, logs, metrics, heatmaps and a sample."""
    _check_args(args)
    attention = training.check_attention(training.attention_from_args(args))
    run = training.Run(args, example="gpt")
    run.check()  # bad flags and folders fail before any data is read
    training.configure_precision(args.mixed_precision)
    keras.utils.set_random_seed(args.seed)
    dist = training.distribution(args.distribute)
    data = TextData(args)
    train_ds, eval_ds = data.datasets(args)

    with run, dist.scope():
        run.note(distribution=dist.describe(), attention=attention, unigram_entropy=data.baseline)
        data.tokenizer.save(os.path.join(run.path, "tokenizer.json"))
        model, initial_epoch = run.restore() or (
            _new_model(args, data.tokenizer.vocab_size, attention),
            0,
        )
        print(
            f"gpt: {model.count_params():,} parameters, vocabulary {data.tokenizer.vocab_size}, "
            f"{len(data.train_ids):,} training tokens; unigram entropy {data.baseline:.3f} nats; "
            f"devices: {dist.describe()}"
        )
        history = training.fit(model, train_ds, args, run, initial_epoch=initial_epoch)
        evaluation = model.evaluate(eval_ds, verbose=0, return_dict=True)
        metrics = training.final_metrics(history, model, evaluation)
        metrics["unigram_entropy"] = data.baseline
        metrics["below_unigram_baseline"] = metrics["test_loss"] < data.baseline
        metrics["loss_per_epoch"] = [float(v) for v in history.history["loss"]]
        _report_losses(metrics, data.baseline)
        if args.sample_length > 0:
            _write_sample(model, data.tokenizer, args, run)
        _write_heatmaps(model, data.tokenizer, data.eval_ids[: min(48, args.seq_len)], run)
        run.save_metrics(metrics)
    print(f"\nrun finished: {run.final_path}")
    for item in ("metrics.json", "sample.txt", "attention", "checkpoints", "logs", "run.json"):
        print(f"  {run.output_path(item)}")
    return metrics


def _write_heatmaps(model, tokenizer, ids, run):
    from keras_attn import viz

    for name, weights in attention_weights(model, ids[None]).items():
        viz.plot_attention(
            weights[0, :4],
            os.path.join(run.attention_dir, f"{name}.png"),
            tokens=tokenizer.tokens(ids),
            title=f"gpt {name}: attention weights of heads 0-3",
        )


def _write_sample(model, tokenizer, args, run):
    prompt = tokenizer.encode(args.prompt)[None]
    sample = generate_text(
        model,
        prompt,
        args.sample_length,
        window=args.seq_len,
        sampling="top_k",
        top_k=5,
        seed=args.seed,
        use_cache=Generator(model).supports_cache,
    )
    sample_text = tokenizer.decode(sample[0])
    with open(os.path.join(run.path, "sample.txt"), "w", encoding="utf-8") as f:
        f.write(sample_text + "\n")
    print("\nsample (top-5):\n" + "-" * 60 + "\n" + sample_text + "\n" + "-" * 60)


def _report_losses(metrics, baseline):
    losses = metrics["loss_per_epoch"]
    print("\ntraining loss per epoch: " + " -> ".join(f"{v:.3f}" for v in losses))
    verdict = "below" if metrics["test_loss"] < baseline else "NOT below"
    print(
        f"held-out loss {metrics['test_loss']:.3f} nats/char "
        f"({metrics['test_loss'] / np.log(2):.2f} bits), {verdict} the unigram-entropy "
        f"baseline {baseline:.3f} nats/char"
    )


def demo(args):
    """`train` with the demo's defaults; a rerun replaces the previous demo folder."""
    if not args.resume:
        args.overwrite = True
    return train(args)


def generate_command(args):
    """Sample from the model of a finished run (`--output`)."""
    folder = os.path.abspath(os.path.expanduser(args.output))
    tokenizer_path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(tokenizer_path):
        raise training.RunError(
            f"No finished GPT run in {folder} (no tokenizer.json). Received: output={args.output!r}"
        )
    run = training.Run(args, example="gpt")
    run.checkpoint_dir = os.path.join(folder, "checkpoints")
    path, _ = run.latest_checkpoint()
    if path is None:
        raise training.RunError(f"No checkpoint in {run.checkpoint_dir}")
    tokenizer = text_lib.CharTokenizer.load(tokenizer_path)
    model = keras.models.load_model(path)
    prompt = tokenizer.encode(args.prompt)[None]
    sampling = (
        "greedy"
        if args.top_k is None and args.temperature is None
        else ("top_k" if args.top_k else "temperature")
    )
    info_path = os.path.join(folder, "run.json")
    with open(info_path, encoding="utf-8") as f:
        trained_window = json.load(f)["args"].get("seq_len")
    out = generate_text(
        model,
        prompt,
        args.sample_length,
        window=trained_window,
        sampling=sampling,
        top_k=args.top_k,
        temperature=args.temperature or 1.0,
        seed=args.seed,
    )
    print(tokenizer.decode(out[0]))
    return out


def _train_side_by_side(args, data, candidates):
    """Train one model per entry of `candidates` (label -> attention), epoch by epoch
    in turn, so machine load falls on all alike. Returns ``(models, rows)``."""
    models, timers, losses = {}, {}, {}
    for label, attention in candidates.items():
        keras.utils.set_random_seed(args.seed)  # same initial weights for every candidate
        models[label] = _new_model(args, data.tokenizer.vocab_size, attention)
        timers[label], losses[label] = training.StepTimer(), []
    steps = args.steps or 50
    for epoch in range(args.epochs):
        for label, model in models.items():
            ds = text_lib.lm_dataset(
                data.train_ids, args.seq_len, args.batch_size, seed=args.seed + epoch, repeat=True
            )
            h = model.fit(
                ds,
                epochs=1,
                steps_per_epoch=steps,
                callbacks=[timers[label]],
                verbose=0,
                shuffle=False,
            )
            losses[label].append(float(h.history["loss"][-1]))
            print(f"epoch {epoch + 1} {label:>10}: loss {losses[label][-1]:.3f}", flush=True)
    _, eval_ds = data.datasets(args)
    rows = {}
    for label, model in models.items():
        step_times = timers[label].times[1:]  # the first step compiles
        rows[label] = {
            "median_step_ms": 1000 * statistics.median(step_times),
            "train_loss": losses[label][-1],
            "test_loss": float(model.evaluate(eval_ds, verbose=0, return_dict=True)["loss"]),
        }
    return models, rows


def compare(args):
    """Train the same GPT with keras_attn attention and with keras.layers.MultiHeadAttention
    side by side; report step times, final losses, and cached vs uncached generation speed."""
    _check_args(args)
    args.overwrite = True
    data = TextData(args)
    candidates = {"keras_attn": training.attention_from_args(args), "keras": {"layer": "keras"}}
    models, rows = _train_side_by_side(args, data, candidates)
    ratio = rows["keras_attn"]["median_step_ms"] / rows["keras"]["median_step_ms"]
    prompt = data.tokenizer.encode(args.prompt)[None]
    speed = generation_speed(models["keras_attn"], prompt, args.sample_length)
    result = {
        "backend": keras.backend.backend(),
        "steps": (args.steps or 50) * args.epochs,
        "batch_size": args.batch_size,
        "model": {k: getattr(args, k) for k in MODEL_FLAGS},
        "attention": candidates["keras_attn"],
        "unigram_entropy": data.baseline,
        "models": rows,
        "step_time_ratio": ratio,
        "generation": speed,
    }
    ours, theirs = rows["keras_attn"], rows["keras"]
    print(
        f"\nstep time keras_attn / keras.layers.MultiHeadAttention: {ratio:.3f} "
        f"(median {ours['median_step_ms']:.1f} ms vs {theirs['median_step_ms']:.1f} ms)\n"
        f"test loss: keras_attn {ours['test_loss']:.3f}, keras {theirs['test_loss']:.3f}, "
        f"unigram baseline {data.baseline:.3f}\n"
        f"generation of {speed['new_tokens']} tokens: cached {speed['cached_s']:.2f} s, "
        f"uncached {speed['uncached_s']:.2f} s, speed-up {speed['speedup']:.1f}x, "
        f"same tokens: {speed['same_tokens']}"
    )
    with training.Run(args, example="gpt-compare") as run:
        run.save_metrics(result)
    print(f"results: {run.output_path('metrics.json')}")
    return result


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


COMMANDS = {
    "train": "train a GPT (or resume one) and write a run folder",
    "demo": "a short run on the embedded Python-docs text (what `make demo` runs)",
    "generate": "sample text from the model of a finished run",
    "compare": "train beside keras.layers.MultiHeadAttention; step times and generation speed",
}

DEFAULTS = {
    "train": {
        "epochs": 10,
        "steps": None,
        "batch_size": 32,
        "learning_rate": 2e-3,
        "output": "runs/gpt",
    },
    "demo": {
        "epochs": 6,
        "steps": 50,
        "batch_size": 32,
        "learning_rate": 3e-3,
        "output": "runs/gpt-demo",
        "verbose": 2,
    },
    "generate": {"output": "runs/gpt"},
    "compare": {
        "epochs": 3,
        "steps": 30,
        "batch_size": 32,
        "learning_rate": 3e-3,
        "output": "runs/gpt-compare",
        "verbose": 0,
    },
}

MODEL_DEFAULTS = {
    "demo": {
        "num_layers": 3,
        "hidden_dim": 128,
        "seq_len": 96,
        "sample_length": 300,
    },
    "compare": {
        "num_layers": 4,
        "hidden_dim": 256,
        "seq_len": 128,
        "max_length": 512,
        "sample_length": 256,
    },
}


def make_parser():
    parser, subparsers = training.make_parser(
        "python -m examples.gpt", "GPT built from keras_attn layers.", COMMANDS, DATASETS, DEFAULTS
    )
    for name, p in subparsers.items():
        _add_model_arguments(p, **MODEL_DEFAULTS.get(name, {}))
    subparsers["generate"].add_argument("--top-k", type=int, default=None)
    subparsers["generate"].add_argument("--temperature", type=float, default=None)
    return parser


def main(argv=None):
    commands = {"train": train, "demo": demo, "generate": generate_command, "compare": compare}
    return training.main(make_parser(), commands, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
