"""BERT assembled from keras_attn layers: an encoder of unmasked self-attention.

Reads top to bottom: how a block calls its attention layer, the layers an
encoder needs (padding mask, learned positions), the encoder block, then the
models: the encoder (token + position + segment embeddings, blocks), the
masked-language-model pretraining model and the classifier that fine-tunes the
same encoder. The training program (``python -m examples.bert pretrain|finetune|compare``)
comes last.

The attention of every block is an argument::

    build_bert_encoder(vocab_size, max_length, attention={"layer": "hard"})
    build_bert_encoder(..., attention={"layer": "attention", "score": "cosine",
                                       "pattern": {"name": "local", "config": {"window": 16}}})
    build_bert_encoder(..., attention={"layer": "keras"})  # keras.layers.MultiHeadAttention

Any registered layer, score, score_mod, pattern and normalizer works, plugin ones
included; ``{"layer": "keras"}`` is the reference the `compare` command trains
side by side.
"""

import glob
import os
import sys

import keras
import numpy as np
from keras import ops

import keras_attn
from examples import datasets
from examples import text as text_lib
from examples import training

PACKAGE = "keras_attn_examples"


# -- how a block calls its attention -------------------------------------------------------


def self_attend(layer, x, mask):
    """Unmasked self-attention of `x` ``(B, T, E)`` over the keys `mask` ``(B, T)`` keeps.

    `keras_attn.SelfAttention` takes its input once; every other layer (ours,
    plugin layers built on `keras_attn.Attention`, Keras's) takes query and value.
    Only the keys are masked, so no query row is left without a key.
    """
    if isinstance(layer, keras_attn.SelfAttention):
        return layer(x, value_mask=mask)
    return layer(x, x, value_mask=mask)


# -- layers -------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package=PACKAGE)
class PaddingMask(keras.layers.Layer):
    """Bool ``(B, T)``: True where `token_ids` is not `pad_id`."""

    def __init__(self, pad_id=0, **kwargs):
        super().__init__(**kwargs)
        self.pad_id = pad_id

    def call(self, token_ids):
        return ops.not_equal(token_ids, self.pad_id)

    def compute_output_spec(self, token_ids):
        return keras.KerasTensor(token_ids.shape, dtype="bool")

    def get_config(self):
        return {**super().get_config(), "pad_id": self.pad_id}


def check_length(length, max_length):
    """Raise the error a sequence longer than the model's maximum gets."""
    if isinstance(length, int) and max_length is not None and length > max_length:
        raise ValueError(
            f"The sequence is longer than the model's maximum length max_length={max_length}. "
            f"Cut or split it. Received: a sequence of length {length}"
        )


@keras.saving.register_keras_serializable(package=PACKAGE)
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding of each position ``0..T-1`` to `x` ``(B, T, E)``.

    Args:
        max_length: The most positions the layer has embeddings for. Longer
            inputs are an error, not silently wrapped or clipped.
    """

    def __init__(self, max_length, initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(max_length, int) or max_length <= 0:
            raise ValueError(
                f"`max_length` must be a positive integer. Received: max_length={max_length!r}"
            )
        self.max_length = max_length
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape):
        check_length(input_shape[1], self.max_length)
        self.embeddings = self.add_weight(
            shape=(self.max_length, input_shape[-1]),
            initializer=self.initializer,
            name="embeddings",
        )

    def call(self, x):
        length = x.shape[1]
        if isinstance(length, int):
            check_length(length, self.max_length)
        else:  # unknown (or symbolic, on JAX) while tracing: slice dynamically
            length = ops.shape(x)[1]
        positions = ops.cast(self.embeddings[:length], x.dtype)  # (T, E)
        return x + positions[None]

    def compute_output_shape(self, input_shape):
        check_length(input_shape[1], self.max_length)
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "max_length": self.max_length,
            "initializer": keras.initializers.serialize(self.initializer),
        }


# -- encoder block -------------------------------------------------------------------------


def encoder_block(
    x,
    mask,
    *,
    num_heads,
    intermediate_dim,
    attention=None,
    dropout=0.1,
    attention_dropout=0.0,
    norm_first=False,
    activation="gelu",
    layer_norm_epsilon=1e-12,
    name="block",
):
    """One Transformer encoder block wired onto `x` ``(B, T, E)``: attention, then MLP.

    Args:
        mask: Bool ``(B, T)`` of real (non-padding) tokens, or None.
        norm_first: Layer norm before each sub-block (ViT) or after the residual
            sum (BERT).

    Returns:
        ``(B, T, E)``.
    """
    hidden_dim = x.shape[-1]
    if hidden_dim % num_heads:
        raise ValueError(
            "`hidden_dim` must be divisible by `num_heads`. "
            f"Received: hidden_dim={hidden_dim}, num_heads={num_heads}"
        )

    def norm(suffix):
        return keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, name=f"{name}_{suffix}")

    attn = training.attention_layer(
        attention, num_heads, hidden_dim // num_heads, attention_dropout, name=f"{name}_attention"
    )
    h = norm("attention_norm")(x) if norm_first else x
    h = self_attend(attn, h, mask)
    h = keras.layers.Dropout(dropout, name=f"{name}_attention_dropout")(h)
    x = keras.layers.Add(name=f"{name}_attention_residual")([x, h])
    if not norm_first:
        x = norm("attention_norm")(x)

    h = norm("mlp_norm")(x) if norm_first else x
    h = keras.layers.Dense(intermediate_dim, activation=activation, name=f"{name}_mlp_in")(h)
    h = keras.layers.Dense(hidden_dim, name=f"{name}_mlp_out")(h)
    h = keras.layers.Dropout(dropout, name=f"{name}_mlp_dropout")(h)
    x = keras.layers.Add(name=f"{name}_mlp_residual")([x, h])
    if not norm_first:
        x = norm("mlp_norm")(x)
    return x


# -- models --------------------------------------------------------------------------------


def _positive(**values):
    for arg, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"`{arg}` must be a positive integer. Received: {arg}={value!r}")


def build_bert_encoder(
    vocab_size,
    max_length,
    num_layers=2,
    num_heads=4,
    hidden_dim=128,
    intermediate_dim=None,
    num_segments=2,
    dropout=0.1,
    attention_dropout=0.0,
    attention=None,
    pad_id=0,
    name="bert_encoder",
):
    """The BERT encoder: embeddings of tokens, positions and segments, then blocks.

    Args:
        vocab_size: Number of token ids.
        max_length: Longest sequence the model takes (positions it has embeddings for).
        num_layers: Number of encoder blocks.
        num_heads: Attention heads per block.
        hidden_dim: Width of the model.
        intermediate_dim: Width of the MLP; defaults to ``4 * hidden_dim``.
        num_segments: Number of segment ids (sentence A / B).
        dropout: Dropout on embeddings and block outputs.
        attention_dropout: Dropout on the attention weights.
        attention: Attention configuration of every block (see `examples.training.attention_layer`).
        pad_id: The padding token id; padded keys get no attention.

    Inputs: ``{"token_ids": (B, T) int, "segment_ids": (B, T) int}``, ``T <= max_length``.

    Returns:
        A functional `keras.Model` whose output is the sequence ``(B, T, hidden_dim)``.
    """
    _positive(
        vocab_size=vocab_size,
        max_length=max_length,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        num_segments=num_segments,
    )
    intermediate_dim = intermediate_dim or 4 * hidden_dim
    attention = training.check_attention(attention)

    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    segment_ids = keras.Input((None,), dtype="int32", name="segment_ids")
    mask = PaddingMask(pad_id, name="padding_mask")(token_ids)

    tokens = keras.layers.Embedding(vocab_size, hidden_dim, name="token_embedding")(token_ids)
    segments = keras.layers.Embedding(num_segments, hidden_dim, name="segment_embedding")(
        segment_ids
    )
    x = keras.layers.Add(name="embeddings_sum")([tokens, segments])
    x = PositionEmbedding(max_length, name="position_embedding")(x)
    x = keras.layers.LayerNormalization(epsilon=1e-12, name="embeddings_norm")(x)
    x = keras.layers.Dropout(dropout, name="embeddings_dropout")(x)
    for i in range(num_layers):
        x = encoder_block(
            x,
            mask,
            num_heads=num_heads,
            intermediate_dim=intermediate_dim,
            attention=attention,
            dropout=dropout,
            attention_dropout=attention_dropout,
            name=f"block_{i}",
        )
    return keras.Model({"token_ids": token_ids, "segment_ids": segment_ids}, x, name=name)


@keras.saving.register_keras_serializable(package=PACKAGE)
class GatherPositions(keras.layers.Layer):
    """``sequence (B, T, E)``, ``positions (B, P)`` -> ``(B, P, E)``."""

    def call(self, sequence, positions):
        index = ops.cast(positions, "int32")[:, :, None]  # (B, P, 1)
        return ops.take_along_axis(sequence, index, axis=1)

    def compute_output_spec(self, sequence, positions):
        return keras.KerasTensor(
            (sequence.shape[0], positions.shape[1], sequence.shape[2]), dtype=sequence.dtype
        )


@keras.saving.register_keras_serializable(package=PACKAGE)
class TakeToken(keras.layers.Layer):
    """``(B, T, E)`` -> ``(B, E)``: the token at position `index` (``[CLS]`` at 0)."""

    def __init__(self, index=0, **kwargs):
        super().__init__(**kwargs)
        self.index = index

    def call(self, sequence):
        return sequence[:, self.index]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return {**super().get_config(), "index": self.index}


def build_bert_pretrainer(encoder, name="bert_pretrainer"):
    """Masked-language-model pretraining model around `encoder`.

    Inputs: the encoder's, plus ``"mask_positions" (B, P)``, the positions whose
    token was masked. Output: logits ``(B, P, vocab_size)`` (float32) of the
    original tokens there. Only the P masked positions go through the vocabulary
    projection, as in BERT.
    """
    vocab_size = encoder.get_layer("token_embedding").input_dim
    hidden_dim = encoder.output.shape[-1]
    inputs = {k: keras.Input((None,), dtype="int32", name=k) for k in ("token_ids", "segment_ids")}
    positions = keras.Input((None,), dtype="int32", name="mask_positions")
    sequence = encoder(inputs)
    x = GatherPositions(name="gather_masked")(sequence, positions)
    x = keras.layers.Dense(hidden_dim, activation="gelu", name="mlm_transform")(x)
    x = keras.layers.LayerNormalization(epsilon=1e-12, name="mlm_norm")(x)
    logits = keras.layers.Dense(vocab_size, dtype="float32", name="mlm_logits")(x)
    return keras.Model({**inputs, "mask_positions": positions}, logits, name=name)


def build_bert_classifier(encoder, num_classes, dropout=0.1, name="bert_classifier"):
    """Sequence classifier fine-tuning `encoder` (its weights are shared, not copied).

    The ``[CLS]`` token (position 0) goes through BERT's pooler (dense + tanh) to
    the class logits ``(B, num_classes)`` (float32).
    """
    _positive(num_classes=num_classes)
    hidden_dim = encoder.output.shape[-1]
    inputs = {k: keras.Input((None,), dtype="int32", name=k) for k in ("token_ids", "segment_ids")}
    sequence = encoder(inputs)
    cls = TakeToken(0, name="cls_token")(sequence)
    pooled = keras.layers.Dense(hidden_dim, activation="tanh", name="pooler")(cls)
    pooled = keras.layers.Dropout(dropout, name="classifier_dropout")(pooled)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(pooled)
    return keras.Model(inputs, logits, name=name)


def build_bert(
    vocab_size,
    max_length,
    num_layers=2,
    num_heads=4,
    hidden_dim=128,
    intermediate_dim=None,
    num_classes=None,
    dropout=0.1,
    attention_dropout=0.0,
    attention=None,
    pad_id=0,
):
    """BERT: the MLM pretraining model, or the classifier when `num_classes` is given.

    A shortcut for `build_bert_encoder` followed by `build_bert_pretrainer` or
    `build_bert_classifier`; arguments as there.
    """
    encoder = build_bert_encoder(
        vocab_size,
        max_length,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        intermediate_dim=intermediate_dim,
        dropout=dropout,
        attention_dropout=attention_dropout,
        attention=attention,
        pad_id=pad_id,
    )
    if num_classes is None:
        return build_bert_pretrainer(encoder)
    return build_bert_classifier(encoder, num_classes, dropout=dropout)


def compile_bert(model, learning_rate=1e-3, weight_decay=0.01):
    """Compile a pretrainer or classifier: AdamW, cross-entropy on logits, accuracy."""
    model.compile(
        optimizer=keras.optimizers.AdamW(
            learning_rate, weight_decay=weight_decay, global_clipnorm=1.0
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


# -- data ----------------------------------------------------------------------------------

PRETRAIN_DATASETS = ("pydoc_text", "imdb_reviews", "glue/sst2")
CLASSIFY_DATASETS = ("pydoc_order", "imdb_reviews", "glue/sst2")
DATASETS = ("pydoc_order", "pydoc_text", "imdb_reviews", "glue/sst2")
# (training split, held-out split): glue/sst2's test labels are hidden (-1).
SPLITS = {"glue/sst2": ("train", "validation")}
TEXT_KEYS = {"glue/sst2": "sentence"}

datasets.register_embedded("pydoc_order", "examples.datasets.pydoc_order:PydocOrder")


def load_examples(args, role, allowed):
    """``(texts, labels or None)`` of the ``"train"`` or ``"test"`` role of ``args.dataset``."""
    datasets.check_name(args.dataset, allowed)
    split = SPLITS.get(args.dataset, ("train", "test"))[0 if role == "train" else 1]
    ds = datasets.load(
        args.dataset, split, data_dir=args.data_dir, download=args.download, allowed=allowed
    )
    key = TEXT_KEYS.get(args.dataset, "text")
    texts, labels = [], []
    for example in ds.as_numpy_iterator():
        texts.append(example[key].decode("utf-8"))
        labels.append(int(example["label"]) if "label" in example else -1)
    return texts, (np.asarray(labels, dtype="int32") if "label" in ds.element_spec else None)


def encode_classification(tokenizer, texts, max_length):
    """``[CLS]`` + characters, cut to `max_length` and padded: int32 ``(N, max_length)``.

    Returns:
        ``(token_ids, number of texts that were cut)``.
    """
    token_ids = np.full((len(texts), max_length), tokenizer.pad_id, dtype="int32")
    cut = 0
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)[: max_length - 1]
        cut += len(text) > max_length - 1
        token_ids[i, 0] = tokenizer.cls_id
        token_ids[i, 1 : 1 + len(ids)] = ids
    return token_ids, cut


def mlm_windows(ids, length, cls_id):
    """Cut a token stream into ``[CLS]`` + ``length - 1`` tokens: int32 ``(N, length)``."""
    ids = np.asarray(ids, dtype="int32")
    body = length - 1
    if len(ids) < body:
        raise ValueError(
            f"The text has {len(ids)} tokens, too few for one window of length {length}. "
            f"Received: seq_len={length}"
        )
    count = len(ids) // body
    windows = ids[: count * body].reshape(count, body)
    return np.concatenate([np.full((count, 1), cls_id, dtype="int32"), windows], axis=1)


def mask_tokens(token_ids, rng, tokenizer, rate=0.15, num_predictions=None):
    """BERT's masking: choose `rate` of each row's ordinary tokens to predict.

    Of the chosen tokens 80% become ``[MASK]``, 10% a random ordinary token and
    10% stay as they are; the model must predict the original token at each.
    Special tokens (``[CLS]``, ``[PAD]``, ...) are never chosen.

    Args:
        token_ids: int ``(N, T)``.
        rng: A `numpy.random.Generator`.
        num_predictions: P, the predictions per row (default ``ceil(rate * T)``);
            rows with fewer chosen tokens are padded with weight 0.

    Returns:
        Dict with ``token_ids (N, T)`` (masked), ``mask_positions (N, P)``,
        ``labels (N, P)`` (the original tokens) and ``weights (N, P)`` (1.0 for a
        real prediction, 0.0 for padding).
    """
    token_ids = np.asarray(token_ids, dtype="int32")
    n, length = token_ids.shape
    p = num_predictions or int(np.ceil(rate * length))
    special = np.array(sorted(tokenizer.special_ids), dtype="int32")
    ordinary = np.setdiff1d(np.arange(tokenizer.vocab_size, dtype="int32"), special)
    masked = token_ids.copy()
    positions = np.zeros((n, p), dtype="int32")
    labels = np.zeros((n, p), dtype="int32")
    weights = np.zeros((n, p), dtype="float32")
    for row in range(n):
        candidates = np.flatnonzero(~np.isin(token_ids[row], special))
        count = min(p, max(1, int(round(rate * len(candidates))))) if len(candidates) else 0
        chosen = np.sort(rng.choice(candidates, size=count, replace=False))
        action = rng.random(count)
        replaced = np.where(
            action < 0.8,
            tokenizer.mask_id,
            np.where(action < 0.9, rng.choice(ordinary, size=count), token_ids[row, chosen]),
        )
        masked[row, chosen] = replaced
        positions[row, :count] = chosen
        labels[row, :count] = token_ids[row, chosen]
        weights[row, :count] = 1.0
    return {"token_ids": masked, "mask_positions": positions, "labels": labels, "weights": weights}


def mlm_arrays(windows, tokenizer, seed, dupe_factor=1):
    """Inputs, labels and weights of `dupe_factor` differently masked copies of `windows`."""
    rng = np.random.default_rng(seed)
    parts = [mask_tokens(windows, rng, tokenizer) for _ in range(dupe_factor)]
    masked = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    inputs = {
        "token_ids": masked["token_ids"],
        "segment_ids": np.zeros_like(masked["token_ids"]),
        "mask_positions": masked["mask_positions"],
    }
    return inputs, masked["labels"], masked["weights"]


def make_dataset(inputs, labels, weights=None, batch_size=32, shuffle=True, seed=0, repeat=False):
    """A batched `tf.data.Dataset` of ``(inputs, labels[, weights])``; training
    batches drop the remainder so every step sees `batch_size` examples."""
    import tensorflow as tf

    parts = (inputs, labels) if weights is None else (inputs, labels, weights)
    ds = tf.data.Dataset.from_tensor_slices(parts)
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    return ds.batch(batch_size, drop_remainder=shuffle).prefetch(2)


def _cls_inputs(token_ids):
    return {"token_ids": token_ids, "segment_ids": np.zeros_like(token_ids)}


def _load_tokenizer(folder):
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        raise training.RunError(
            f"No finished BERT pretraining run in {folder} (no tokenizer.json). "
            f"Received: pretrained={folder!r}"
        )
    return text_lib.CharTokenizer.load(path)


def load_pretrained_encoder(folder):
    """``(encoder, tokenizer)`` of the finished pretraining run in `folder` (latest checkpoint)."""
    folder = os.path.abspath(os.path.expanduser(folder))
    tokenizer = _load_tokenizer(folder)
    paths = sorted(glob.glob(os.path.join(folder, "checkpoints", "epoch-*.keras")))
    if not paths:
        raise training.RunError(
            f"No checkpoint in {os.path.join(folder, 'checkpoints')}. Received: pretrained={folder!r}"
        )
    pretrainer = keras.models.load_model(paths[-1])
    return pretrainer.get_layer("bert_encoder"), tokenizer


def max_length_of(encoder):
    return encoder.get_layer("position_embedding").max_length


# -- commands ------------------------------------------------------------------------------


def _add_model_arguments(parser, **defaults):
    g = parser.add_argument_group("model")
    g.add_argument("--max-length", type=int, default=defaults.get("max_length", 128))
    g.add_argument("--num-layers", type=int, default=defaults.get("num_layers", 2))
    g.add_argument("--num-heads", type=int, default=defaults.get("num_heads", 4))
    g.add_argument("--hidden-dim", type=int, default=defaults.get("hidden_dim", 128))
    g.add_argument("--dropout", type=float, default=defaults.get("dropout", 0.1))


def _check_args(args):
    for arg in ("epochs", "batch_size", "max_length", "num_layers", "num_heads", "hidden_dim"):
        if getattr(args, arg) <= 0:
            raise ValueError(
                f"--{arg.replace('_', '-')} must be positive. Received: {arg}={getattr(args, arg)}"
            )
    if args.steps is not None and args.steps <= 0:
        raise ValueError(f"--steps must be positive. Received: steps={args.steps}")
    if getattr(args, "seq_len", None) is not None:
        check_length(args.seq_len, args.max_length)
        if args.seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2. Received: seq_len={args.seq_len}")


def _build(args, tokenizer, attention, num_classes=None):
    return build_bert(
        tokenizer.vocab_size,
        args.max_length,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        hidden_dim=args.hidden_dim,
        num_classes=num_classes,
        dropout=args.dropout,
        attention=attention,
        pad_id=tokenizer.pad_id,
    )


def pretraining_data(args, tokenizer=None):
    """Tokenizer, masked training arrays, held-out arrays and the unigram baseline."""
    train_texts, _ = load_examples(args, "train", PRETRAIN_DATASETS)
    test_texts, _ = load_examples(args, "test", PRETRAIN_DATASETS)
    train_text, test_text = "\n\n".join(train_texts), "\n\n".join(test_texts)
    tokenizer = tokenizer or text_lib.CharTokenizer.from_texts([train_text])
    train_ids = tokenizer.encode(train_text)
    train = mlm_arrays(
        mlm_windows(train_ids, args.seq_len, tokenizer.cls_id),
        tokenizer,
        args.seed,
        args.dupe_factor,
    )
    test_windows = mlm_windows(tokenizer.encode(test_text), args.seq_len, tokenizer.cls_id)
    test = mlm_arrays(test_windows, tokenizer, args.seed + 1)
    baseline = text_lib.unigram_entropy(train_ids, tokenizer.vocab_size)
    return tokenizer, train, test, test_windows, baseline


def classification_data(args, tokenizer=None):
    """Tokenizer, ``(inputs, labels)`` for training and test, and facts about the data."""
    train_texts, train_labels = load_examples(args, "train", CLASSIFY_DATASETS)
    test_texts, test_labels = load_examples(args, "test", CLASSIFY_DATASETS)
    tokenizer = tokenizer or text_lib.CharTokenizer.from_texts(train_texts)
    train_ids, train_cut = encode_classification(tokenizer, train_texts, args.max_length)
    test_ids, test_cut = encode_classification(tokenizer, test_texts, args.max_length)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    majority = float(np.bincount(test_labels, minlength=num_classes).max() / len(test_labels))
    facts = {
        "num_classes": num_classes,
        "train_examples": len(train_texts),
        "test_examples": len(test_texts),
        "texts_cut_to_max_length": int(train_cut + test_cut),
        "majority_class_test_accuracy": majority,
    }
    return (
        tokenizer,
        (_cls_inputs(train_ids), train_labels),
        (_cls_inputs(test_ids), test_labels),
        facts,
    )


def _heatmaps(encoder, token_ids, tokenizer, run, length=40):
    """Attention heatmaps of the first `length` tokens of two held-out examples."""
    ids = np.asarray(token_ids[:2, :length])
    training.save_attention_heatmaps(
        encoder,
        _cls_inputs(ids),
        run.attention_dir,
        tokens=[tokenizer.tokens(row) for row in ids],
    )


def _finish(run, metrics):
    run.save_metrics(metrics)
    print(f"\nrun finished: {run.final_path}")
    for item in ("metrics.json", "attention", "checkpoints", "logs", "run.json"):
        print(f"  {run.output_path(item)}")


def pretrain(args):
    """Masked-language-model pretraining; writes a run folder with the tokenizer."""
    _check_args(args)
    attention = training.check_attention(training.attention_from_args(args))
    datasets.check_name(args.dataset, PRETRAIN_DATASETS)
    run = training.Run(args, example="bert-pretrain")
    run.check()  # bad flags and folders fail before any data is read
    training.configure_precision(args.mixed_precision)
    keras.utils.set_random_seed(args.seed)
    dist = training.distribution(args.distribute)
    tokenizer, train, test, test_windows, baseline = pretraining_data(args)
    train_ds = make_dataset(*train, args.batch_size, seed=args.seed, repeat=args.steps is not None)
    test_ds = make_dataset(*test, args.batch_size, shuffle=False)

    with run, dist.scope():
        run.note(distribution=dist.describe(), attention=attention, unigram_entropy=baseline)
        tokenizer.save(os.path.join(run.path, "tokenizer.json"))
        restored = run.restore()
        if restored is None:
            model, initial_epoch = (
                compile_bert(_build(args, tokenizer, attention), args.learning_rate),
                0,
            )
        else:
            model, initial_epoch = restored
        print(
            f"bert pretrain: {model.count_params():,} parameters, vocabulary "
            f"{tokenizer.vocab_size}, {len(train[1]):,} masked windows of {args.seq_len}; "
            f"unigram entropy {baseline:.3f} nats; devices: {dist.describe()}"
        )
        history = training.fit(model, train_ds, args, run, initial_epoch=initial_epoch)
        evaluation = model.evaluate(test_ds, verbose=0, return_dict=True)
        metrics = training.final_metrics(history, model, evaluation)
        metrics.update(
            unigram_entropy=baseline,
            below_unigram_baseline=metrics["test_loss"] < baseline,
            loss_per_epoch=[float(v) for v in history.history["loss"]],
        )
        print(
            f"\nmasked-token loss on held-out text {metrics['test_loss']:.3f} nats "
            f"(accuracy {metrics['test_accuracy']:.3f}); unigram entropy {baseline:.3f}"
        )
        _heatmaps(model.get_layer("bert_encoder"), test_windows, tokenizer, run)
        _finish(run, metrics)
    return metrics


def finetune(args):
    """Fine-tune a classifier (on a pretrained encoder with --pretrained, else from scratch)."""
    _check_args(args)
    attention = training.check_attention(training.attention_from_args(args))
    datasets.check_name(args.dataset, CLASSIFY_DATASETS)
    run = training.Run(args, example="bert-finetune")
    run.check()
    tokenizer = _load_tokenizer(os.path.expanduser(args.pretrained)) if args.pretrained else None
    training.configure_precision(args.mixed_precision)
    keras.utils.set_random_seed(args.seed)
    dist = training.distribution(args.distribute)

    with run, dist.scope():
        restored = run.restore()
        encoder = None
        if restored is None and args.pretrained:
            encoder, tokenizer = load_pretrained_encoder(args.pretrained)
            args.max_length = max_length_of(encoder)  # the encoder's own maximum
        tokenizer, (x_train, y_train), (x_test, y_test), facts = classification_data(
            args, tokenizer
        )
        train_ds = make_dataset(
            x_train,
            y_train,
            batch_size=args.batch_size,
            seed=args.seed,
            repeat=args.steps is not None,
        )
        test_ds = make_dataset(x_test, y_test, batch_size=args.batch_size, shuffle=False)
        run.note(
            distribution=dist.describe(),
            attention=attention,
            data=facts,
            pretrained=args.pretrained,
        )
        tokenizer.save(os.path.join(run.path, "tokenizer.json"))
        if restored is not None:
            model, initial_epoch = restored
        elif encoder is not None:
            model = build_bert_classifier(encoder, facts["num_classes"], dropout=args.dropout)
            model, initial_epoch = compile_bert(model, args.learning_rate), 0
        else:
            model = _build(args, tokenizer, attention, num_classes=facts["num_classes"])
            model, initial_epoch = compile_bert(model, args.learning_rate), 0
        print(
            f"bert finetune on {args.dataset}: {model.count_params():,} parameters, "
            f"{facts['train_examples']:,} training / {facts['test_examples']:,} test texts, "
            f"{facts['num_classes']} classes; "
            f"{'pretrained encoder ' + args.pretrained if args.pretrained else 'from scratch'}"
        )
        history = training.fit(
            model, train_ds, args, run, validation_data=test_ds, initial_epoch=initial_epoch
        )
        evaluation = model.evaluate(test_ds, verbose=0, return_dict=True)
        metrics = training.final_metrics(history, model, evaluation)
        metrics.update(facts)
        print(
            f"\ntest accuracy {metrics['test_accuracy']:.3f} "
            f"(majority class {facts['majority_class_test_accuracy']:.3f})"
        )
        _heatmaps(model.get_layer("bert_encoder"), x_test["token_ids"], tokenizer, run)
        _finish(run, metrics)
    return metrics


def compare(args):
    """Train the same BERT with keras_attn attention and with keras.layers.MultiHeadAttention
    side by side (``--task classify``: fine-tune from scratch; ``mlm``: pretraining)."""
    _check_args(args)
    attention = training.check_attention(training.attention_from_args(args))
    allowed = CLASSIFY_DATASETS if args.task == "classify" else PRETRAIN_DATASETS
    if args.task == "mlm" and args.dataset == CLASSIFY_DATASETS[0]:
        args.dataset = PRETRAIN_DATASETS[0]  # the default dataset of the other task
    datasets.check_name(args.dataset, allowed)
    args.overwrite = True
    run = training.Run(args, example="bert-compare")
    run.check()
    keras.utils.set_random_seed(args.seed)
    if args.task == "classify":
        tokenizer, train, test, facts = classification_data(args)
        num_classes = facts["num_classes"]
    else:
        tokenizer, train, test, _, baseline = pretraining_data(args)
        num_classes, facts = None, {"unigram_entropy": baseline}
    steps = args.steps or len(train[1]) // args.batch_size
    result = training.side_by_side(
        lambda spec: compile_bert(
            _build(args, tokenizer, spec, num_classes=num_classes), args.learning_rate
        ),
        attention,
        lambda epoch: make_dataset(
            *train, batch_size=args.batch_size, seed=args.seed + epoch, repeat=True
        ),
        make_dataset(*test, batch_size=args.batch_size, shuffle=False),
        args.epochs,
        steps,
        args.seed,
    )
    result.update(
        task=args.task,
        dataset=args.dataset,
        backend=keras.backend.backend(),
        steps=steps * args.epochs,
        batch_size=args.batch_size,
        attention=attention,
        model={
            k: getattr(args, k) for k in ("max_length", "num_layers", "num_heads", "hidden_dim")
        },
        data=facts,
    )
    training.print_side_by_side(result)
    with run:
        run.save_metrics(result)
    print(f"results: {run.output_path('metrics.json')}")
    return result


COMMANDS = {
    "pretrain": "masked-language-model pretraining (default: the embedded Python-docs text)",
    "finetune": "fine-tune a classifier (default: the embedded pydoc_order task)",
    "compare": "train beside keras.layers.MultiHeadAttention; step times and final metrics",
}

DEFAULTS = {
    "pretrain": {
        "epochs": 3,
        "batch_size": 32,
        "learning_rate": 1e-3,
        "output": "runs/bert-pretrain",
    },
    "finetune": {
        "epochs": 10,
        "batch_size": 32,
        "learning_rate": 1e-3,
        "output": "runs/bert-finetune",
    },
    "compare": {
        "epochs": 12,
        "steps": 40,
        "batch_size": 32,
        "learning_rate": 1e-3,
        "output": "runs/bert-compare",
        "verbose": 0,
    },
}


def make_parser():
    parser, subparsers = training.make_parser(
        "python -m examples.bert",
        "BERT built from keras_attn layers.",
        COMMANDS,
        DATASETS,
        DEFAULTS,
    )
    for p in subparsers.values():
        _add_model_arguments(p)
    subparsers["pretrain"].set_defaults(dataset=PRETRAIN_DATASETS[0])
    for name in ("pretrain", "compare"):
        subparsers[name].add_argument("--seq-len", type=int, default=128, help="MLM window")
        subparsers[name].add_argument(
            "--dupe-factor", type=int, default=2, help="differently masked copies of the text"
        )
    subparsers["finetune"].add_argument(
        "--pretrained", default=None, help="a finished `pretrain` run folder to start from"
    )
    subparsers["compare"].add_argument("--task", choices=("classify", "mlm"), default="classify")
    return parser


def main(argv=None):
    commands = {"pretrain": pretrain, "finetune": finetune, "compare": compare}
    return training.main(make_parser(), commands, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
