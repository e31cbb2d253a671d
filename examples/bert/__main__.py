"""The BERT training program: ``python -m examples.bert pretrain|finetune|compare``.

    python -m examples.bert pretrain                                   # MLM on pydoc_text
    python -m examples.bert finetune --pretrained runs/bert-pretrain   # classifier on pydoc_order
    python -m examples.bert finetune --dataset imdb_reviews --layer hard
    python -m examples.bert compare [--task classify|mlm]              # beside Keras's layer
    python -m examples.bert pretrain --distribute model_parallel --context-parallel 2  # JAX

`pretrain` and `finetune` follow the recipe every example shares
(`examples.common.training.train`); after the metrics are saved they draw heatmaps
of the attention weights, a step that may fail without failing the run.
"""

import os
import sys

import numpy as np

from examples import datasets
from examples.bert.data import CLASSIFY_DATASETS
from examples.bert.data import DATASETS
from examples.bert.data import PRETRAIN_DATASETS
from examples.bert.data import ClassificationData
from examples.bert.data import PretrainingData
from examples.bert.data import cls_inputs
from examples.bert.data import load_pretrained_encoder
from examples.bert.model import build_bert
from examples.bert.model import build_bert_classifier
from examples.bert.model import compile_bert
from examples.bert.model import encoder_config
from examples.common import cli
from examples.common import compare as compare_lib
from examples.common import heatmaps
from examples.common import training
from examples.common.attention import AttentionConfig

MODEL_FLAGS = ("max_length", "num_layers", "num_heads", "hidden_dim")
MODEL_DEFAULTS = {"max_length": 128, "num_layers": 2, "num_heads": 4, "hidden_dim": 128}
ATTENTION_FLAGS = ("layer", "score", "pattern", "normalizer", "score_mods")


def check_args(args):
    """Raise ValueError naming the flag for flags that cannot work together."""
    cli.check_positive(args, "epochs", "steps", "batch_size", *MODEL_FLAGS)
    length = getattr(args, "seq_len", None)
    cli.check_context_parallel(
        args, length or args.max_length, "--seq-len" if length else "--max-length"
    )
    if length is not None:
        cli.check_window(args)
        if args.seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2. Received: seq_len={args.seq_len}")


def new_model(args, attention, data, num_classes=None):
    model = build_bert(
        data.tokenizer.vocab_size,
        args.max_length,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        hidden_dim=args.hidden_dim,
        num_classes=num_classes,
        dropout=args.dropout,
        attention=attention,
        pad_id=data.tokenizer.pad_id,
    )
    return compile_bert(model, args.learning_rate)


def write_heatmaps(encoder, token_ids, tokenizer, run, length=40):
    """Attention heatmaps of the first `length` tokens of two held-out examples."""
    ids = np.asarray(token_ids[:2, :length])
    heatmaps.save_attention_heatmaps(
        encoder,
        cls_inputs(ids),
        run.attention_dir,
        tokens=[tokenizer.tokens(row) for row in ids],
    )


def with_context_parallel(encoder, context_parallel):
    """A copy of `encoder` (same weights) whose attention layers take `context_parallel`."""
    config = encoder.get_config()
    config["attention"] = dict(config["attention"], context_parallel=context_parallel)
    copy = type(encoder).from_config(config)
    copy.set_weights(encoder.get_weights())
    return copy


# -- pretrain -------------------------------------------------------------------------


def pretrain(args):
    """Masked-language-model pretraining; writes a run folder with the tokenizer."""
    check_args(args)
    datasets.check_name(args.dataset, PRETRAIN_DATASETS)

    def summary(model, data):
        return (
            f"{model.count_params():,} parameters, vocabulary {data.tokenizer.vocab_size}, "
            f"{len(data.train[1]):,} masked windows of {args.seq_len}; "
            f"unigram entropy {data.baseline:.3f} nats"
        )

    def conclude(metrics, data):
        print(
            f"\nmasked-token loss on held-out text {metrics['test_loss']:.3f} nats "
            f"(accuracy {metrics['test_accuracy']:.3f}); unigram entropy {data.baseline:.3f}"
        )
        return {"below_unigram_baseline": metrics["test_loss"] < data.baseline}

    def optional_steps(model, data, run):
        encoder = model.encoder
        return {"heatmaps": lambda: write_heatmaps(encoder, data.test_windows, data.tokenizer, run)}

    return training.train(
        args,
        "bert-pretrain",
        load_data=PretrainingData,
        build_model=new_model,
        summary=summary,
        conclude=conclude,
        optional_steps=optional_steps,
    )


# -- finetune -------------------------------------------------------------------------


def take_from_pretrained(args):
    """Make the model flags say what the model will be; returns the pretrained tokenizer.

    With ``--pretrained`` the encoder is the pretrained one: its sizes and its
    attention replace the flags left out, and a flag given another value is an
    error (naming both). Without it, flags left out take their defaults.
    """
    if not args.pretrained:
        for flag, value in MODEL_DEFAULTS.items():
            if getattr(args, flag) is None:
                setattr(args, flag, value)
        for flag, value in AttentionConfig().to_dict().items():
            if getattr(args, flag) is None:
                setattr(args, flag, value)
        return None
    folder = os.path.abspath(os.path.expanduser(args.pretrained))
    encoder, tokenizer = load_pretrained_encoder(folder)
    actual = encoder_config(encoder)
    attention = encoder.attention_config.to_dict()
    actual.update({flag: attention[flag] for flag in ATTENTION_FLAGS})
    for flag, value in actual.items():
        given = getattr(args, flag)
        if given is not None and given != value:
            option = "--score-mod" if flag == "score_mods" else f"--{flag.replace('_', '-')}"
            raise ValueError(
                f"{option} {given} differs from the pretrained encoder's {flag}={value} "
                f"(--pretrained {args.pretrained}); leave {option} out to take the "
                f"encoder's. Received: {flag}={given}"
            )
        setattr(args, flag, value)
    return tokenizer


def finetune(args):
    """Fine-tune a classifier (on a pretrained encoder with --pretrained, else from scratch)."""
    datasets.check_name(args.dataset, CLASSIFY_DATASETS)
    tokenizer = take_from_pretrained(args)
    check_args(args)

    def build(args, attention, data):
        if not args.pretrained:
            return new_model(args, attention, data, num_classes=data.facts["num_classes"])
        encoder, _ = load_pretrained_encoder(args.pretrained)  # in the devices' scope
        if attention.context_parallel is not None:
            encoder = with_context_parallel(encoder, attention.context_parallel)
        model = build_bert_classifier(encoder, data.facts["num_classes"], dropout=args.dropout)
        return compile_bert(model, args.learning_rate)

    def summary(model, data):
        facts = data.facts
        start = f"pretrained encoder {args.pretrained}" if args.pretrained else "from scratch"
        return (
            f"on {args.dataset}: {model.count_params():,} parameters, "
            f"{facts['train_examples']:,} training / {facts['test_examples']:,} test texts, "
            f"{facts['num_classes']} classes; {start}"
        )

    def conclude(metrics, data):
        print(
            f"\ntest accuracy {metrics['test_accuracy']:.3f} "
            f"(majority class {data.facts['majority_class_test_accuracy']:.3f})"
        )
        return {}

    def optional_steps(model, data, run):
        encoder = model.encoder
        ids = data.test[0]["token_ids"]
        return {"heatmaps": lambda: write_heatmaps(encoder, ids, data.tokenizer, run)}

    return training.train(
        args,
        "bert-finetune",
        load_data=lambda args: ClassificationData(args, tokenizer),
        build_model=build,
        summary=summary,
        conclude=conclude,
        optional_steps=optional_steps,
        notes={"pretrained": args.pretrained},
    )


# -- compare --------------------------------------------------------------------------


def compare(args):
    """Train the same BERT with keras_attn attention and with keras.layers.MultiHeadAttention
    side by side (``--task classify``: fine-tune from scratch; ``mlm``: pretraining)."""
    check_args(args)
    if args.task == "mlm" and args.dataset == CLASSIFY_DATASETS[0]:
        args.dataset = PRETRAIN_DATASETS[0]  # the default dataset of the other task
    datasets.check_name(
        args.dataset, CLASSIFY_DATASETS if args.task == "classify" else PRETRAIN_DATASETS
    )
    if args.task == "classify":
        load_data = ClassificationData

        def build(args, attention, data):
            return new_model(args, attention, data, num_classes=data.facts["num_classes"])

    else:
        load_data, build = PretrainingData, new_model
    return compare_lib.compare(
        args, "bert-compare", load_data, build, MODEL_FLAGS, after=lambda *_: {"task": args.task}
    )


# -- command line ---------------------------------------------------------------------

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


def add_model_arguments(parser, defaults):
    g = parser.add_argument_group("model")
    for flag in MODEL_FLAGS:
        g.add_argument(f"--{flag.replace('_', '-')}", type=int, default=defaults[flag])
    g.add_argument("--dropout", type=float, default=0.1)


def make_parser():
    parser, subparsers = cli.make_parser(
        "python -m examples.bert",
        "BERT built from keras_attn layers.",
        COMMANDS,
        DATASETS,
        DEFAULTS,
    )
    for name, p in subparsers.items():
        add_model_arguments(p, MODEL_DEFAULTS if name != "finetune" else dict.fromkeys(MODEL_FLAGS))
    subparsers["pretrain"].set_defaults(dataset=PRETRAIN_DATASETS[0])
    for name in ("pretrain", "compare"):
        subparsers[name].add_argument("--seq-len", type=int, default=128, help="MLM window")
        subparsers[name].add_argument(
            "--dupe-factor", type=int, default=2, help="differently masked copies of the text"
        )
    # With --pretrained the encoder's sizes and attention are taken from that run;
    # a flag given is checked against them (`take_from_pretrained`).
    subparsers["finetune"].set_defaults(**dict.fromkeys(ATTENTION_FLAGS))
    subparsers["finetune"].add_argument(
        "--pretrained",
        default=None,
        help="a finished `pretrain` run folder to start from (its encoder's sizes and "
        "attention are the model's; default sizes without it: "
        + ", ".join(f"{k} {v}" for k, v in MODEL_DEFAULTS.items())
        + ")",
    )
    subparsers["compare"].add_argument("--task", choices=("classify", "mlm"), default="classify")
    return parser


def main(argv=None):
    commands = {"pretrain": pretrain, "finetune": finetune, "compare": compare}
    return cli.main(make_parser(), commands, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
