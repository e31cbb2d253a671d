"""Vision Transformer assembled from keras_attn layers: self-attention over image patches.

Reads top to bottom: the layers ViT adds (class token), the model (patch
embedding, class token, learned positions, pre-norm encoder blocks shared with
`examples.bert`, classifier), then the training program
(``python -m examples.vit train|compare``).

The attention of every block is an argument, so ViT with hard attention is::

    build_vit(image_shape=(8, 8, 1), num_classes=10, patch_size=2, attention={"layer": "hard"})
"""

import sys

import keras
import numpy as np
from keras import ops

from examples import datasets
from examples import training
from examples.bert import PACKAGE
from examples.bert import PositionEmbedding
from examples.bert import TakeToken
from examples.bert import encoder_block


@keras.saving.register_keras_serializable(package=PACKAGE)
class ClassToken(keras.layers.Layer):
    """Prepends one learned token to the patch sequence: ``(B, N, E)`` -> ``(B, N + 1, E)``."""

    def __init__(self, initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape):
        self.token = self.add_weight(
            shape=(1, 1, input_shape[-1]), initializer=self.initializer, name="token"
        )

    def call(self, patches):
        batch = ops.shape(patches)[0]
        token = ops.broadcast_to(
            ops.cast(self.token, patches.dtype), (batch, 1, ops.shape(patches)[-1])
        )  # (B, 1, E)
        return ops.concatenate([token, patches], axis=1)

    def compute_output_shape(self, input_shape):
        length = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], length, input_shape[2])

    def get_config(self):
        return {
            **super().get_config(),
            "initializer": keras.initializers.serialize(self.initializer),
        }


def _check_image(image_shape, patch_size):
    if len(image_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in image_shape):
        raise ValueError(
            "`image_shape` must be (height, width, channels) of positive integers. "
            f"Received: image_shape={image_shape!r}"
        )
    if not isinstance(patch_size, int) or patch_size <= 0:
        raise ValueError(
            f"`patch_size` must be a positive integer. Received: patch_size={patch_size!r}"
        )
    if image_shape[0] % patch_size or image_shape[1] % patch_size:
        raise ValueError(
            "The image height and width must be multiples of `patch_size`. "
            f"Received: image_shape={tuple(image_shape)}, patch_size={patch_size}"
        )


def build_vit(
    image_shape,
    num_classes,
    patch_size=2,
    num_layers=4,
    num_heads=4,
    hidden_dim=64,
    mlp_dim=None,
    dropout=0.1,
    attention_dropout=0.0,
    attention=None,
    name="vit",
):
    """ViT classifier (Dosovitskiy et al., 2021) built from keras_attn layers.

    Args:
        image_shape: ``(height, width, channels)`` of the input images.
        num_classes: Number of classes.
        patch_size: Side of the square patches; each becomes one token.
        num_layers: Number of encoder blocks.
        num_heads: Attention heads per block.
        hidden_dim: Width of the model.
        mlp_dim: Width of the blocks' MLP; defaults to ``2 * hidden_dim``.
        dropout: Dropout on embeddings and block outputs.
        attention_dropout: Dropout on the attention weights.
        attention: Attention configuration of every block (see
            `examples.training.attention_layer`): e.g. ``{"layer": "hard"}``.

    Inputs: images ``(B, height, width, channels)`` with pixels in 0..255.

    Returns:
        A functional `keras.Model` with class logits ``(B, num_classes)`` (float32).
    """
    image_shape = tuple(image_shape)
    _check_image(image_shape, patch_size)
    for arg, value in (("num_classes", num_classes), ("num_layers", num_layers)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{arg}` must be a positive integer. Received: {arg}={value!r}")
    mlp_dim = mlp_dim or 2 * hidden_dim
    attention = training.check_attention(attention)
    num_patches = (image_shape[0] // patch_size) * (image_shape[1] // patch_size)

    images = keras.Input(image_shape, name="images")
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(images)
    # A patch_size-strided convolution is a dense layer applied to each flattened patch.
    x = keras.layers.Conv2D(hidden_dim, patch_size, strides=patch_size, name="patch_embedding")(
        x
    )  # (B, H / p, W / p, E)
    x = keras.layers.Reshape((num_patches, hidden_dim), name="patches")(x)  # (B, N, E)
    x = ClassToken(name="class_token")(x)  # (B, N + 1, E)
    x = PositionEmbedding(num_patches + 1, name="position_embedding")(x)
    x = keras.layers.Dropout(dropout, name="embeddings_dropout")(x)
    for i in range(num_layers):
        x = encoder_block(
            x,
            None,
            num_heads=num_heads,
            intermediate_dim=mlp_dim,
            attention=attention,
            dropout=dropout,
            attention_dropout=attention_dropout,
            norm_first=True,
            layer_norm_epsilon=1e-6,
            name=f"block_{i}",
        )
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x)
    x = TakeToken(0, name="class_output")(x)  # (B, E)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(images, logits, name=name)


def compile_vit(model, learning_rate=2e-3, total_steps=1000, weight_decay=0.05):
    """AdamW with linear warm-up (first 10%) and cosine decay over `total_steps`."""
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps=max(1, total_steps),
        warmup_target=learning_rate,
        warmup_steps=max(1, total_steps // 10),
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=weight_decay, global_clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


# -- data ----------------------------------------------------------------------------------

DATASETS = ("sklearn_digits", "mnist", "cifar10")
PATCH_SIZES = {"sklearn_digits": 2, "mnist": 4, "cifar10": 4}
FLIPS = ("cifar10",)  # mirrored digits are other symbols; mirrored animals are animals

datasets.register_embedded("sklearn_digits", "examples.datasets.digits:SklearnDigits")


def load_images(args, split):
    """``(images uint8 (N, H, W, C), labels int32 (N,))`` of one split of ``args.dataset``."""
    ds = datasets.load(
        args.dataset,
        split,
        data_dir=args.data_dir,
        download=args.download,
        allowed=DATASETS,
        as_supervised=True,
    )
    images, labels = [], []
    for image, label in ds.as_numpy_iterator():
        images.append(image)
        labels.append(label)
    if not images:
        raise datasets.DatasetError(f"Split {split!r} of {args.dataset!r} is empty.")
    return np.stack(images), np.asarray(labels, dtype="int32")


def image_dataset(
    images, labels, batch_size, shuffle=True, seed=0, augment=False, flip=False, repeat=False
):
    """Batches of ``(images float32, labels)``; with `augment`, random shifts of up to
    1/8 of the side (at least one pixel) and, with `flip`, horizontal mirroring."""
    import tensorflow as tf

    height, width = images.shape[1:3]
    pad = max(1, height // 8)

    def shift(image, label):
        image = tf.cast(image, "float32")
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.random_crop(image, (height, width, images.shape[3]), seed=seed)
        if flip:
            image = tf.image.random_flip_left_right(image, seed=seed)
        return image, label

    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if augment:
        ds = ds.map(shift, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda image, label: (tf.cast(image, "float32"), label))
    return ds.batch(batch_size, drop_remainder=shuffle).prefetch(2)


# -- commands ------------------------------------------------------------------------------


def _add_model_arguments(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--patch-size", type=int, default=None, help="default: 2 for digits, else 4")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--num-heads", type=int, default=4)
    g.add_argument("--hidden-dim", type=int, default=64)
    g.add_argument("--mlp-dim", type=int, default=None, help="default: 2 * hidden-dim")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--no-augment", dest="augment", action="store_false")


def _check_args(args):
    for arg in ("epochs", "batch_size", "num_layers", "num_heads", "hidden_dim"):
        if getattr(args, arg) <= 0:
            raise ValueError(
                f"--{arg.replace('_', '-')} must be positive. Received: {arg}={getattr(args, arg)}"
            )
    if args.steps is not None and args.steps <= 0:
        raise ValueError(f"--steps must be positive. Received: steps={args.steps}")


def _data(args):
    (x_train, y_train), (x_test, y_test) = load_images(args, "train"), load_images(args, "test")
    patch_size = args.patch_size or PATCH_SIZES.get(args.dataset, 4)
    _check_image(x_train.shape[1:], patch_size)
    facts = {
        "image_shape": list(x_train.shape[1:]),
        "num_classes": int(max(y_train.max(), y_test.max())) + 1,
        "train_examples": len(y_train),
        "test_examples": len(y_test),
        "patch_size": patch_size,
    }
    return (x_train, y_train), (x_test, y_test), facts


def _build(args, facts, attention):
    return build_vit(
        tuple(facts["image_shape"]),
        facts["num_classes"],
        patch_size=facts["patch_size"],
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        hidden_dim=args.hidden_dim,
        mlp_dim=args.mlp_dim,
        dropout=args.dropout,
        attention=attention,
    )


def _train_dataset(args, x, y, seed, repeat):
    return image_dataset(
        x,
        y,
        args.batch_size,
        seed=seed,
        augment=args.augment,
        flip=args.dataset in FLIPS,
        repeat=repeat,
    )


def train(args):
    """Train (or resume) a ViT; write checkpoints, logs, metrics and heatmaps."""
    _check_args(args)
    attention = training.check_attention(training.attention_from_args(args))
    datasets.check_name(args.dataset, DATASETS)
    run = training.Run(args, example="vit")
    run.check()  # bad flags and folders fail before any data is read
    training.configure_precision(args.mixed_precision)
    keras.utils.set_random_seed(args.seed)
    dist = training.distribution(args.distribute)
    (x_train, y_train), (x_test, y_test), facts = _data(args)
    steps_per_epoch = args.steps or len(y_train) // args.batch_size
    train_ds = _train_dataset(args, x_train, y_train, args.seed, repeat=args.steps is not None)
    test_ds = image_dataset(x_test, y_test, args.batch_size, shuffle=False)

    with run, dist.scope():
        run.note(distribution=dist.describe(), attention=attention, data=facts)
        restored = run.restore()
        if restored is None:
            model = compile_vit(
                _build(args, facts, attention), args.learning_rate, args.epochs * steps_per_epoch
            )
            initial_epoch = 0
        else:
            model, initial_epoch = restored
        print(
            f"vit on {args.dataset}: {model.count_params():,} parameters, "
            f"{facts['train_examples']:,} training / {facts['test_examples']:,} test images "
            f"{tuple(facts['image_shape'])}, patches {facts['patch_size']}x{facts['patch_size']}; "
            f"devices: {dist.describe()}"
        )
        history = training.fit(
            model, train_ds, args, run, validation_data=test_ds, initial_epoch=initial_epoch
        )
        evaluation = model.evaluate(test_ds, verbose=0, return_dict=True)
        metrics = training.final_metrics(history, model, evaluation)
        metrics.update(facts)
        print(f"\ntest accuracy {metrics['test_accuracy']:.4f}")
        num_patches = (facts["image_shape"][0] // facts["patch_size"]) * (
            facts["image_shape"][1] // facts["patch_size"]
        )
        tokens = ["[CLS]"] + [f"p{i}" for i in range(num_patches)]
        training.save_attention_heatmaps(
            model, [x_test[:2].astype("float32")], run.attention_dir, tokens=[tokens, tokens]
        )
        run.save_metrics(metrics)
    print(f"\nrun finished: {run.final_path}")
    for item in ("metrics.json", "attention", "checkpoints", "logs", "run.json"):
        print(f"  {run.output_path(item)}")
    return metrics


def compare(args):
    """Train the same ViT with keras_attn attention and with keras.layers.MultiHeadAttention
    side by side; report step times and final test accuracy."""
    _check_args(args)
    attention = training.check_attention(training.attention_from_args(args))
    datasets.check_name(args.dataset, DATASETS)
    args.overwrite = True
    run = training.Run(args, example="vit-compare")
    run.check()
    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test), facts = _data(args)
    steps = args.steps or len(y_train) // args.batch_size
    result = training.side_by_side(
        lambda spec: compile_vit(
            _build(args, facts, spec), args.learning_rate, args.epochs * steps
        ),
        attention,
        lambda epoch: _train_dataset(args, x_train, y_train, args.seed + epoch, repeat=True),
        image_dataset(x_test, y_test, args.batch_size, shuffle=False),
        args.epochs,
        steps,
        args.seed,
    )
    result.update(
        dataset=args.dataset,
        backend=keras.backend.backend(),
        steps=steps * args.epochs,
        batch_size=args.batch_size,
        attention=attention,
        data=facts,
        model={k: getattr(args, k) for k in ("num_layers", "num_heads", "hidden_dim", "mlp_dim")},
    )
    training.print_side_by_side(result)
    with run:
        run.save_metrics(result)
    print(f"results: {run.output_path('metrics.json')}")
    return result


COMMANDS = {
    "train": "train a ViT (or resume one) and write a run folder",
    "compare": "train beside keras.layers.MultiHeadAttention; step times and test accuracy",
}

DEFAULTS = {
    "train": {"epochs": 40, "batch_size": 64, "learning_rate": 2e-3, "output": "runs/vit"},
    "compare": {
        "epochs": 30,
        "batch_size": 64,
        "learning_rate": 2e-3,
        "output": "runs/vit-compare",
        "verbose": 0,
    },
}


def make_parser():
    parser, subparsers = training.make_parser(
        "python -m examples.vit", "ViT built from keras_attn layers.", COMMANDS, DATASETS, DEFAULTS
    )
    for p in subparsers.values():
        _add_model_arguments(p)
    return parser


def main(argv=None):
    commands = {"train": train, "compare": compare}
    return training.main(make_parser(), commands, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
