"""The ViT training program: ``python -m examples.vit train|compare``.

    python -m examples.vit train                       # embedded digits, a few minutes on CPU
    python -m examples.vit train --dataset cifar10 --layer hard
    python -m examples.vit compare                     # beside keras.layers.MultiHeadAttention

`train` follows the recipe every example shares (`examples.common.training.train`);
after the metrics are saved it draws heatmaps of the attention weights, a step
that may fail without failing the run.
"""

import sys

from examples import datasets
from examples.common import cli
from examples.common import compare as compare_lib
from examples.common import heatmaps
from examples.common import training
from examples.vit.data import DATASETS
from examples.vit.data import ImageData
from examples.vit.model import build_vit
from examples.vit.model import compile_vit

MODEL_FLAGS = ("num_layers", "num_heads", "hidden_dim", "mlp_dim")


def check_args(args):
    """Raise ValueError naming the flag for flags that cannot work together."""
    cli.check_positive(args, "epochs", "steps", "batch_size", "num_layers", "num_heads")
    cli.check_positive(args, "hidden_dim", "mlp_dim", "patch_size")
    datasets.check_name(args.dataset, DATASETS)


def new_model(args, attention, data):
    facts = data.facts
    model = build_vit(
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
    # The learning-rate schedule spans the whole run.
    total_steps = args.epochs * (args.steps or data.steps_per_epoch())
    return compile_vit(model, args.learning_rate, total_steps)


def train(args):
    """Train (or resume) a ViT; write checkpoints, logs, metrics and heatmaps."""
    check_args(args)

    def summary(model, data):
        facts, side = data.facts, data.facts["patch_size"]
        return (
            f"on {args.dataset}: {model.count_params():,} parameters, "
            f"{facts['train_examples']:,} training / {facts['test_examples']:,} test images "
            f"{tuple(facts['image_shape'])}, patches {side}x{side}"
        )

    def conclude(metrics, data):
        print(f"\ntest accuracy {metrics['test_accuracy']:.4f}")
        return {}

    def optional_steps(model, data, run):
        tokens = ["[CLS]"] + [f"p{i}" for i in range(data.num_patches())]
        images = data.test[0][:2].astype("float32")

        def draw():
            heatmaps.save_attention_heatmaps(
                model, images, run.attention_dir, tokens=[tokens, tokens], image=images
            )

        return {"heatmaps": draw}

    return training.train(
        args,
        "vit",
        load_data=ImageData,
        build_model=new_model,
        summary=summary,
        conclude=conclude,
        optional_steps=optional_steps,
    )


def compare(args):
    """Train the same ViT with keras_attn attention and with keras.layers.MultiHeadAttention
    side by side; report step times and final test accuracy."""
    check_args(args)
    return compare_lib.compare(args, "vit-compare", ImageData, new_model, MODEL_FLAGS)


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


def add_model_arguments(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--patch-size", type=int, default=None, help="default: 2 for digits, else 4")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--num-heads", type=int, default=4)
    g.add_argument("--hidden-dim", type=int, default=64)
    g.add_argument("--mlp-dim", type=int, default=None, help="default: 2 * hidden-dim")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--no-augment", dest="augment", action="store_false")


def make_parser():
    parser, subparsers = cli.make_parser(
        "python -m examples.vit", "ViT built from keras_attn layers.", COMMANDS, DATASETS, DEFAULTS
    )
    for p in subparsers.values():
        add_model_arguments(p)
    return parser


def main(argv=None):
    commands = {"train": train, "compare": compare}
    return cli.main(make_parser(), commands, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
