"""The GPT training program: ``python -m examples.gpt train|demo|generate|compare``.

    python -m examples.gpt demo                      # a few minutes on CPU, embedded text
    python -m examples.gpt train --dataset tiny_shakespeare --epochs 10 --output runs/gpt
    python -m examples.gpt train --pattern '{"name": "local", "config": {"window": 32}}'
    python -m examples.gpt train --pack --position-encoding rope   # documents packed in rows
    python -m examples.gpt train --position-embedding none --position-encoding rope \
        --pattern '{"name": "local", "config": {"window": 32}}'   # generates past --max-length
    python -m examples.gpt generate --output runs/gpt --prompt "The " --top-k 5
    python -m examples.gpt compare                   # keras_attn vs keras.layers.MultiHeadAttention
    python -m examples.gpt train --distribute model_parallel --context-parallel 2   # JAX, a mesh

`train` follows the recipe every example shares (`examples.common.training.train`);
after the metrics are saved it writes a sample of text and heatmaps of the
attention weights, steps that may fail without failing the run.
"""

import json
import os
import sys

import keras
import numpy as np

from examples.common import cli
from examples.common import compare as compare_lib
from examples.common import heatmaps
from examples.common import text as text_lib
from examples.common import training
from examples.common.run import RunError
from examples.common.run import latest_checkpoint
from examples.gpt.data import DATASETS
from examples.gpt.data import TextData
from examples.gpt.generation import Generator
from examples.gpt.generation import generate_text
from examples.gpt.generation import generation_speed
from examples.gpt.model import build_gpt
from examples.gpt.model import compile_gpt
from examples.gpt.model import single_document

MODEL_FLAGS = (
    "max_length",
    "seq_len",
    "num_layers",
    "num_heads",
    "hidden_dim",
    "dropout",
    "position_embedding",
)


def check_args(args):
    """Raise ValueError naming the flag for flags that cannot work together."""
    if args.max_length is None:
        args.max_length = args.seq_len
    cli.check_positive(args, "epochs", "steps", "batch_size", "seq_len", "max_length")
    cli.check_positive(args, "num_layers", "num_heads", "hidden_dim")
    cli.check_window(args)
    cli.check_context_parallel(args, args.seq_len, "--seq-len")
    if (getattr(args, "context_parallel", None) or 1) > 1 and args.dropout:
        raise ValueError(
            "--dropout also drops attention weights, which context parallelism does not "
            "support (each device would draw its own dropout mask): pass --dropout 0. "
            f"Received: dropout={args.dropout}, context_parallel={args.context_parallel}"
        )


def new_model(args, attention, data):
    model = build_gpt(
        data.tokenizer.vocab_size,
        args.max_length,
        args.num_layers,
        args.num_heads,
        args.hidden_dim,
        dropout=args.dropout,
        attention=attention,
        packed=bool(getattr(args, "pack", False)),
        position_embedding=getattr(args, "position_embedding", "learned"),
    )
    return compile_gpt(model, args.learning_rate)


# -- train ----------------------------------------------------------------------------


def train(args):
    """Train (or resume) a GPT; write checkpoints, logs, metrics, a sample and heatmaps."""
    check_args(args)

    def summary(model, data):
        return (
            f"{model.count_params():,} parameters, vocabulary {data.tokenizer.vocab_size}, "
            f"{len(data.train_ids):,} training tokens; unigram entropy {data.baseline:.3f} nats"
        )

    def optional_steps(model, data, run):
        steps = {}
        if args.sample_length > 0:
            steps["sample"] = lambda: write_sample(model, data.tokenizer, args, run)
        ids = data.eval_ids[: min(48, args.seq_len)]
        steps["heatmaps"] = lambda: write_heatmaps(model, data.tokenizer, ids, run)
        return steps

    return training.train(
        args,
        "gpt",
        load_data=TextData,
        build_model=new_model,
        summary=summary,
        conclude=report_losses,
        optional_steps=optional_steps,
    )


def report_losses(metrics, data):
    """Print the losses beside the unigram-entropy baseline; returns the verdict."""
    below = metrics["test_loss"] < data.baseline
    print(
        "\ntraining loss per epoch: " + " -> ".join(f"{v:.3f}" for v in metrics["loss_per_epoch"])
    )
    print(
        f"held-out loss {metrics['test_loss']:.3f} nats/char "
        f"({metrics['test_loss'] / np.log(2):.2f} bits), {'below' if below else 'NOT below'} "
        f"the unigram-entropy baseline {data.baseline:.3f} nats/char"
    )
    return {"below_unigram_baseline": below}


def write_heatmaps(model, tokenizer, ids, run):
    heatmaps.save_heatmaps(
        heatmaps.attention_weights(model, single_document(model, ids[None])),
        run.attention_dir,
        tokens=[tokenizer.tokens(ids)],
        examples=1,
        filename="weights.png",
        title="gpt: attention weights",
    )


def write_sample(model, tokenizer, args, run):
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


def demo(args):
    """`train` with the demo's defaults; a rerun replaces the previous demo folder."""
    if not args.resume:
        args.overwrite = True
    return train(args)


# -- generate -------------------------------------------------------------------------


def generate_command(args):
    """Sample from the model of a finished run (`--output`)."""
    folder = os.path.abspath(os.path.expanduser(args.output))
    tokenizer_path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(tokenizer_path):
        raise RunError(
            f"No finished GPT run in {folder} (no tokenizer.json). Received: output={args.output!r}"
        )
    path, _ = latest_checkpoint(os.path.join(folder, "checkpoints"))
    if path is None:
        raise RunError(f"No checkpoint in {os.path.join(folder, 'checkpoints')}")
    tokenizer = text_lib.CharTokenizer.load(tokenizer_path)
    model = keras.models.load_model(path)
    prompt = tokenizer.encode(args.prompt)[None]
    sampling = (
        "greedy"
        if args.top_k is None and args.temperature is None
        else ("top_k" if args.top_k else "temperature")
    )
    with open(os.path.join(folder, "run.json"), encoding="utf-8") as f:
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


# -- compare --------------------------------------------------------------------------


def compare(args):
    """Train the same GPT with keras_attn attention and with keras.layers.MultiHeadAttention
    side by side; report step times, final losses, and cached vs uncached generation speed."""
    check_args(args)

    def generation(models, data):
        prompt = data.tokenizer.encode(args.prompt)[None]
        speed = generation_speed(models["keras_attn"], prompt, args.sample_length)
        print(
            f"unigram baseline {data.baseline:.3f}; generation of {speed['new_tokens']} tokens: "
            f"cached {speed['cached_s']:.2f} s, uncached {speed['uncached_s']:.2f} s, "
            f"speed-up {speed['speedup']:.1f}x, same tokens: {speed['same_tokens']}"
        )
        return {"generation": speed}

    return compare_lib.compare(
        args, "gpt-compare", TextData, new_model, MODEL_FLAGS, after=generation
    )


# -- command line ---------------------------------------------------------------------

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


PACK_HELP = (
    "pack the documents of the dataset (one per TFDS example: a topic of pydoc_text; "
    "tiny_shakespeare has one per split) into full rows of --seq-len tokens, without "
    "padding, with segment ids: no token attends to another document, positions "
    "(learned and --position-encoding) restart at each document, and the next-token "
    "targets that would cross into the next document are left out of the loss. A "
    "document longer than what is left of a row continues in the next row. Default: "
    "the documents joined by blank lines into one stream cut into windows"
)


def add_model_arguments(parser, **defaults):
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
    g.add_argument(
        "--position-embedding",
        choices=("learned", "none"),
        default=defaults.get("position_embedding", "learned"),
        help="learned: --max-length learned positions (default); none: no position "
        "embedding, positions from --position-encoding rope. With none and a causal "
        'sliding window (--pattern \'{"name": "local", "config": {"window": W}}\') '
        "generation goes past --max-length with a "
        "ring cache of `window` slots per layer (constant memory)",
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


def make_parser():
    parser, subparsers = cli.make_parser(
        "python -m examples.gpt", "GPT built from keras_attn layers.", COMMANDS, DATASETS, DEFAULTS
    )
    for name, p in subparsers.items():
        add_model_arguments(p, **MODEL_DEFAULTS.get(name, {}))
    for name in ("train", "demo"):
        subparsers[name].add_argument("--pack", action="store_true", help=PACK_HELP)
    subparsers["generate"].add_argument("--top-k", type=int, default=None)
    subparsers["generate"].add_argument("--temperature", type=float, default=None)
    return parser


def main(argv=None):
    commands = {"train": train, "demo": demo, "generate": generate_command, "compare": compare}
    return cli.main(make_parser(), commands, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
