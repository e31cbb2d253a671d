"""The command line every example shares: one set of flags, one way to fail.

An example's ``__main__`` builds its parser with `make_parser`, which gives each
subcommand the same flags:

    --epochs N --steps N --batch-size N --learning-rate X --seed N
    --output DIR [--resume | --overwrite]
    --mixed-precision {mixed_float16,mixed_bfloat16}
    --distribute {none,mirrored,tpu,multiworker,data_parallel,model_parallel} [--cpu-devices N]
    --context-parallel N [--context-parallel-strategy S] --model-parallel M   (JAX)
    --num-processes N --process-id I --coordinator HOST:PORT                  (JAX)
    --dataset NAME --data-dir DIR [--no-download]
    --layer L --score S --pattern P --normalizer N --score-mod M (repeatable)
    --verbose {0,1,2}

Each attention flag takes a registry name (plugins' included) or a JSON spec,
e.g. ``--pattern '{"name": "local", "config": {"window": 64, "causal": true}}'``;
`attention_from_args` turns them into the `AttentionConfig` the model builders
take (`examples.common.attention`), checked there. `main` runs a command and turns the errors a
user can fix into one ``error: ...`` line.
"""

import argparse
import json
import os

from examples.common.attention import REFERENCE_LAYER
from examples.common.attention import AttentionConfig
from examples.common.devices import DISTRIBUTE_CHOICES
from examples.common.devices import PRECISION_CHOICES
from examples.common.devices import initialize_processes
from examples.common.devices import split_cpu
from examples.common.run import RunError
from examples.datasets import DatasetError
from keras_attn.context_parallel import STRATEGIES as CONTEXT_PARALLEL_STRATEGIES
from keras_attn.errors import PluginError


def parse_component(text):
    """A command-line component spec: JSON (``{"name":..., "config":...}``) or a name."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text}") from None
        if not isinstance(spec, dict) or "name" not in spec:
            raise argparse.ArgumentTypeError(
                f'a JSON spec needs a "name" (and optionally "config"). Received: {text}'
            )
        return spec
    return text


def add_run_arguments(parser, datasets, defaults):
    """Add the shared run flags to `parser`; `defaults` sets this example's defaults.

    Args:
        parser: An `argparse.ArgumentParser` (one subcommand's).
        datasets: The dataset names the example accepts (first = default).
        defaults: Dict with keys ``epochs``, ``steps``, ``batch_size``,
            ``learning_rate``, ``output`` (any may be missing).
    """
    g = parser.add_argument_group("run")
    g.add_argument("--epochs", type=int, default=defaults.get("epochs", 1))
    g.add_argument(
        "--steps",
        type=int,
        default=defaults.get("steps"),
        help="steps per epoch (default: one pass over the data)",
    )
    g.add_argument("--batch-size", type=int, default=defaults.get("batch_size", 32))
    g.add_argument("--learning-rate", type=float, default=defaults.get("learning_rate", 1e-3))
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output", default=defaults.get("output", "runs/example"), help="run folder")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")
    g.add_argument("--mixed-precision", choices=PRECISION_CHOICES[1:], default=None)
    g.add_argument("--distribute", choices=DISTRIBUTE_CHOICES, default="none")
    g.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="split the CPU into N logical devices (TensorFlow; for trying --distribute)",
    )
    g.add_argument(
        "--context-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split each sequence over N devices (JAX, with --distribute data_parallel or "
        "model_parallel): the attention layers get keras_attn.ContextParallel(axis='seq')",
    )
    g.add_argument(
        "--context-parallel-strategy", choices=CONTEXT_PARALLEL_STRATEGIES, default="auto"
    )
    g.add_argument(
        "--model-parallel",
        type=int,
        default=None,
        metavar="M",
        help="split the heads over M devices (--distribute model_parallel; default: the "
        "most devices that divide the heads)",
    )
    g.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="processes of one run, e.g. one per host (JAX): each runs the same command "
        "with its --process-id; process I > 0 writes its run folder to OUTPUT-processI "
        "and no checkpoints",
    )
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument("--coordinator", default=None, help="host:port of process 0")
    g.add_argument("--verbose", type=int, choices=(0, 1, 2), default=defaults.get("verbose", 1))
    d = parser.add_argument_group("data")
    d.add_argument("--dataset", default=datasets[0], help=f"one of: {', '.join(datasets)}")
    d.add_argument("--data-dir", default=None, help="TFDS data dir (default ~/tensorflow_datasets)")
    d.add_argument("--no-download", dest="download", action="store_false")


def add_attention_arguments(parser, defaults=None):
    """Add ``--layer --score --pattern --normalizer --score-mod --position-encoding
    --num-kv-heads`` to `parser`."""
    defaults = defaults or {}
    g = parser.add_argument_group(
        "attention", 'registry names (plugins\' too) or JSON specs {"name": ..., "config": {...}}'
    )
    g.add_argument(
        "--layer",
        type=parse_component,
        default=defaults.get("layer", "attention"),
        help=f"attention layer (default attention; {REFERENCE_LAYER!r} = keras.layers.MultiHeadAttention)",
    )
    g.add_argument("--score", type=parse_component, default=defaults.get("score", "scaled_dot"))
    g.add_argument("--pattern", type=parse_component, default=defaults.get("pattern", "full"))
    g.add_argument(
        "--normalizer", type=parse_component, default=defaults.get("normalizer", "softmax")
    )
    g.add_argument(
        "--score-mod",
        dest="score_mods",
        type=parse_component,
        action="append",
        default=None,
        help="repeat for several",
    )
    g.add_argument(
        "--position-encoding",
        type=parse_component,
        default=defaults.get("position_encoding"),
        help="applied to queries and keys, e.g. rope (default: none)",
    )
    g.add_argument(
        "--num-kv-heads",
        dest="num_key_value_heads",
        type=int,
        default=defaults.get("num_key_value_heads"),
        help="key/value heads, grouped-query attention (default: one per query head)",
    )


def make_parser(prog, description, commands, datasets, defaults=None):
    """A parser with one subcommand per entry of `commands`, each with the shared flags.

    Args:
        prog: Program name, e.g. ``"python -m examples.gpt"``.
        description: One line for ``--help``.
        commands: Dict ``{name: help}``, e.g. ``{"train": "...", "demo": "..."}``.
        datasets: Names the example accepts (first = default).
        defaults: Dict ``{command: {flag: default}}`` for `add_run_arguments`.

    Returns:
        ``(parser, subparsers_by_name)``; add example flags to the subparsers.
    """
    defaults = defaults or {}
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    subparsers = {}
    for name, help_text in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_run_arguments(p, datasets, defaults.get(name, {}))
        add_attention_arguments(p, defaults.get(name, {}))
        subparsers[name] = p
    return parser, subparsers


def attention_from_args(args):
    """The `AttentionConfig` of the parsed flags, checked: an unknown component fails
    here, before any model or folder is made (the error lists the names there are).
    With ``--context-parallel N`` (N > 1) its layers shard the sequence over the
    mesh axis ``"seq"``."""
    context_parallel = None
    if (getattr(args, "context_parallel", None) or 1) > 1:
        strategy = getattr(args, "context_parallel_strategy", None) or "auto"
        context_parallel = {"axis": "seq", "strategy": strategy}
    return AttentionConfig(
        layer=args.layer,
        score=args.score,
        pattern=args.pattern,
        normalizer=args.normalizer,
        score_mods=args.score_mods or (),
        position_encoding=getattr(args, "position_encoding", None),
        num_key_value_heads=getattr(args, "num_key_value_heads", None),
        context_parallel=context_parallel,
    )


def check_context_parallel(args, length, flag):
    """Raise ValueError unless the sequence length `length` (the value of `flag`)
    splits over ``--context-parallel`` devices, and no dropout falls on the attention
    weights (each device would draw its own)."""
    parts = getattr(args, "context_parallel", None) or 1
    if parts < 1:
        raise ValueError(f"--context-parallel must be positive. Received: context_parallel={parts}")
    if parts > 1 and length is not None and length % parts:
        raise ValueError(
            f"{flag} {length} does not split over --context-parallel {parts} devices: pass a "
            f"multiple of {parts}. Received: {flag.lstrip('-').replace('-', '_')}={length}, "
            f"context_parallel={parts}"
        )


def check_positive(args, *names):
    """Raise ValueError naming the flag if one of `names` (attributes of `args`) is not
    positive; None (a flag left to its default) passes."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(
                f"--{name.replace('_', '-')} must be positive. Received: {name}={value}"
            )


def check_window(args):
    """``--seq-len`` (the training window) must fit in ``--max-length`` (the model's positions)."""
    if args.seq_len is not None and args.max_length is not None and args.seq_len > args.max_length:
        raise ValueError(
            f"--seq-len {args.seq_len} is longer than the model's maximum length "
            f"--max-length {args.max_length}: pass a smaller --seq-len or a larger --max-length. "
            f"Received: seq_len={args.seq_len}, max_length={args.max_length}"
        )


def main(parser, commands, argv=None):
    """Parse `argv`, then run ``commands[args.command](args)``.

    Known failures (`RunError`, dataset and component errors, ValueError) print
    ``error: ...`` and exit with status 2, without a traceback (unless the
    environment sets ``EXAMPLES_TRACEBACK=1``).
    """
    args = parser.parse_args(argv)
    try:
        processes = initialize_processes(
            *(getattr(args, k, None) for k in ("num_processes", "process_id", "coordinator"))
        )
        if processes > 1 and args.process_id > 0:  # one run folder per process
            args.output = f"{args.output.rstrip('/')}-process{args.process_id}"
        split_cpu(getattr(args, "cpu_devices", None))
        return commands[args.command](args)
    except (RunError, DatasetError, PluginError, ValueError, TypeError) as e:
        if os.environ.get("EXAMPLES_TRACEBACK"):
            raise
        parser.exit(2, f"error: {e}\n(set EXAMPLES_TRACEBACK=1 for the traceback)\n")
