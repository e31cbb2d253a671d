"""The training conventions every example follows: one command line, one output folder.

An example's module (``python -m examples.gpt``) builds its command line with
`make_parser`, which gives each subcommand the same flags:

    --epochs N --steps N --batch-size N --learning-rate X --seed N
    --output DIR [--resume | --overwrite]
    --mixed-precision {mixed_float16,mixed_bfloat16}
    --distribute {none,mirrored,tpu,multiworker,data_parallel} [--cpu-devices N]
    --dataset NAME --data-dir DIR [--no-download]
    --layer L --score S --pattern P --normalizer N --score-mod M (repeatable)
    --verbose {0,1,2}

Each attention flag takes a registry name (plugins' included) or a JSON spec,
e.g. ``--pattern '{"name": "local", "config": {"window": 64, "causal": true}}'``;
`attention_from_args` turns them into the ``attention`` dict the model builders
take, and `attention_layer` builds one layer from it.

A run writes its folder through `Run`, a context manager:

    with Run(args, example="gpt") as run:    # works in DIR.partial, run.json: running
        model, initial_epoch = run.restore() or (build(), 0)
        history = fit(model, train_ds, args, run, initial_epoch=initial_epoch)
        run.save_metrics({...})              # metrics.json
    # finished: DIR.partial renamed to DIR, run.json: finished

so a folder named DIR is always a finished run; a failed run stays in
``DIR.partial`` with ``run.json`` saying ``"status": "failed"`` and the error.
Inside: ``checkpoints/epoch-NNNN.keras`` (`keras.callbacks.ModelCheckpoint`),
``logs/`` (`keras.callbacks.TensorBoard`), ``metrics.json``, ``attention/*.png``
(`save_attention_heatmaps`) and ``run.json``.

Devices: `distribution(name)` returns a `Distribution` whose ``scope()`` the
model is built and compiled in: tf.distribute strategies on TensorFlow
(``mirrored``: all GPUs, else all logical CPUs; ``tpu``; ``multiworker``),
`keras.distribution.DataParallel` on JAX (``data_parallel``).
"""

import argparse
import contextlib
import datetime
import glob
import json
import os
import re
import shutil
import statistics
import sys
import time
import traceback

import keras
import numpy as np

from keras_attn import plugins

DISTRIBUTE_CHOICES = ("none", "mirrored", "tpu", "multiworker", "data_parallel")
PRECISION_CHOICES = ("float32", "mixed_float16", "mixed_bfloat16")
REFERENCE_LAYER = "keras"  # --layer keras: keras.layers.MultiHeadAttention, the reference
CHECKPOINT_PATTERN = "epoch-{epoch:04d}.keras"


class RunError(ValueError):
    """A run that cannot start as asked (output folder, devices, precision)."""


# -- command line --------------------------------------------------------------------


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
    g.add_argument("--verbose", type=int, choices=(0, 1, 2), default=defaults.get("verbose", 1))
    d = parser.add_argument_group("data")
    d.add_argument("--dataset", default=datasets[0], help=f"one of: {', '.join(datasets)}")
    d.add_argument("--data-dir", default=None, help="TFDS data dir (default ~/tensorflow_datasets)")
    d.add_argument("--no-download", dest="download", action="store_false")


def add_attention_arguments(parser, defaults=None):
    """Add ``--layer --score --pattern --normalizer --score-mod`` to `parser`."""
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
    """The ``attention`` dict of the model builders, from parsed flags."""
    return {
        "layer": args.layer,
        "score": args.score,
        "pattern": args.pattern,
        "normalizer": args.normalizer,
        "score_mods": list(args.score_mods or []),
    }


def check_attention(attention):
    """Resolve every component of an ``attention`` dict now, so an unknown name
    fails before any model or folder is made (the error lists the names there are)."""
    attention = {**default_attention(), **(attention or {})}
    layer = attention["layer"]
    if layer != REFERENCE_LAYER:
        plugins.get("layer", layer["name"] if isinstance(layer, dict) else layer)
    plugins.resolve("score", attention["score"])
    plugins.resolve("pattern", attention["pattern"])
    plugins.resolve("normalizer", attention["normalizer"])
    for mod in attention["score_mods"]:
        plugins.resolve("score_mod", mod)
    return attention


def default_attention():
    return {
        "layer": "attention",
        "score": "scaled_dot",
        "pattern": "full",
        "normalizer": "softmax",
        "score_mods": [],
    }


def attention_layer(attention, num_heads, key_dim, dropout=0.0, name=None, **kwargs):
    """One attention layer from an ``attention`` dict (see `attention_from_args`).

    ``layer`` is a registry name or ``{"name": ..., "config": {...}}`` (its config
    adds constructor arguments, e.g. ``window`` of ``local``); the other entries
    are passed as `score`, `pattern`, `normalizer`, `score_mods`. Presets that fix
    a component (``hard`` its normalizer, ``local`` its pattern) keep their own.
    ``layer="keras"`` gives `keras.layers.MultiHeadAttention`, the reference
    (which takes no components).
    """
    attention = {**default_attention(), **(attention or {})}
    layer = attention["layer"]
    if layer == REFERENCE_LAYER:
        return keras.layers.MultiHeadAttention(
            num_heads=num_heads, key_dim=key_dim, dropout=dropout, name=name, **kwargs
        )
    config = {}
    if isinstance(layer, dict):
        config = dict(layer.get("config") or {})
        layer = layer["name"]
    cls = plugins.get("layer", layer)
    arguments = dict(
        num_heads=num_heads,
        key_dim=key_dim,
        dropout=dropout,
        name=name,
        score=attention["score"],
        pattern=attention["pattern"],
        normalizer=attention["normalizer"],
        score_mods=list(attention["score_mods"]),
    )
    arguments.update(kwargs)
    arguments.update(config)
    return cls(**arguments)


# -- precision and devices -----------------------------------------------------------


def configure_precision(mode):
    """Set the global dtype policy (``None`` = float32). Returns the policy name."""
    policy = mode or "float32"
    if policy not in PRECISION_CHOICES:
        raise RunError(
            f"Unknown precision {mode!r}; use one of {PRECISION_CHOICES}. Received: {mode}"
        )
    keras.config.set_dtype_policy(policy)
    return policy


def split_cpu(count):
    """Split the host CPU into `count` logical devices (TensorFlow; call before any op)."""
    if count is None or count <= 1:
        return
    if keras.backend.backend() == "jax":
        import jax

        if len(jax.devices()) < count:
            raise RunError(
                f"JAX sees {len(jax.devices())} device(s); set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={count} before starting Python. "
                f"Received: cpu_devices={count}"
            )
        return
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError as e:
        raise RunError(f"Too late to split the CPU (TensorFlow already started): {e}") from e


class Distribution:
    """Where a model runs. Build and compile the model inside ``scope()``.

    Attributes:
        name: The ``--distribute`` value.
        num_replicas: Number of devices the batch is split over.
    """

    def __init__(self, name, scope_factory=contextlib.nullcontext, num_replicas=1, devices=()):
        self.name = name
        self._scope_factory = scope_factory
        self.num_replicas = num_replicas
        self.devices = list(devices)

    def scope(self):
        return self._scope_factory()

    def describe(self):
        return f"{self.name} over {self.num_replicas} device(s) {self.devices}"


def distribution(name):
    """The `Distribution` for a ``--distribute`` value on the current backend.

    Raises:
        RunError: the backend does not offer `name`, or the devices are missing
            (``tpu`` without a TPU).
    """
    backend = keras.backend.backend()
    if name in (None, "none"):
        return Distribution("none")
    if backend == "tensorflow":
        return _tf_distribution(name)
    if backend == "jax":
        if name != "data_parallel":
            raise RunError(
                f"On the JAX backend use --distribute data_parallel "
                f"(keras.distribution.DataParallel). Received: distribute={name!r}"
            )
        import jax

        devices = jax.devices()
        # Set globally, not in a scope: `fit` shards each batch by the distribution
        # active when it runs, not the one the model was built under.
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        return Distribution(name, contextlib.nullcontext, len(devices), [str(d) for d in devices])
    raise RunError(f"--distribute is supported on tensorflow and jax. Received: backend={backend}")


def _tf_distribution(name):
    import tensorflow as tf

    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
        devices = devices or [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    elif name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as e:
            raise RunError(
                "--distribute tpu needs a TPU, and none was found "
                f"(TPUClusterResolver: {type(e).__name__}: {e}). Received: distribute='tpu'"
            ) from None
        strategy = tf.distribute.TPUStrategy(resolver)
        devices = [d.name for d in tf.config.list_logical_devices("TPU")]
    elif name == "multiworker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        devices = [f"workers from TF_CONFIG: {os.environ.get('TF_CONFIG', 'unset (1 worker)')}"]
    else:
        raise RunError(
            "On the TensorFlow backend use --distribute none, mirrored, tpu or multiworker "
            f"(data_parallel is JAX's). Received: distribute={name!r}"
        )
    return Distribution(name, strategy.scope, strategy.num_replicas_in_sync, devices)


# -- the run folder ------------------------------------------------------------------


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json(path, data):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_jsonable(data), f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


class Run:
    """A run's output folder, written in ``DIR.partial`` and renamed to ``DIR`` at the end.

    Args:
        args: The parsed flags (``output``, ``resume``, ``overwrite`` are used; all
            are recorded in ``run.json``).
        example: Name of the example, e.g. ``"gpt"``.

    Attributes:
        final_path: ``DIR``, which exists only for finished runs.
        path: ``DIR.partial``, where this run writes.
        checkpoint_dir, log_dir, attention_dir: Sub-folders of `path`.
    """

    def __init__(self, args, example):
        self.args = args
        self.example = example
        self.final_path = os.path.abspath(os.path.expanduser(args.output))
        self.path = self.final_path.rstrip(os.sep) + ".partial"
        self.checkpoint_dir = os.path.join(self.path, "checkpoints")
        self.log_dir = os.path.join(self.path, "logs")
        self.attention_dir = os.path.join(self.path, "attention")
        self.info = {}
        self.resumed_from = None

    def check(self):
        """Raise `RunError` if the folder cannot be used as asked (nothing written yet)."""
        resume = getattr(self.args, "resume", False)
        overwrite = getattr(self.args, "overwrite", False)
        if os.path.exists(self.final_path) and not os.path.isdir(self.final_path):
            raise RunError(
                f"--output must be a folder. Received: output={self.final_path!r} (a file)"
            )
        if os.path.isdir(self.final_path) and not (resume or overwrite):
            raise RunError(
                f"{self.final_path} holds a finished run. Pass --resume to continue "
                f"training it or --overwrite to replace it. Received: output={self.args.output!r}"
            )
        if resume and not (os.path.isdir(self.path) or os.path.isdir(self.final_path)):
            raise RunError(
                f"--resume: no run to resume in {self.final_path} (or {self.path}). "
                f"Received: output={self.args.output!r}"
            )

    def __enter__(self):
        self.check()
        resume = getattr(self.args, "resume", False)
        if resume and os.path.isdir(self.path):
            pass  # an interrupted run: carry on where it stopped
        elif resume:
            shutil.copytree(self.final_path, self.path)
        elif os.path.isdir(self.path):
            shutil.rmtree(self.path)  # a stale, unfinished run that is not resumed
        for d in (self.path, self.checkpoint_dir, self.log_dir, self.attention_dir):
            os.makedirs(d, exist_ok=True)
        self.info = {
            "example": self.example,
            "status": "running",
            "started": _now(),
            "command": " ".join(sys.argv),
            "args": vars(self.args),
            "backend": keras.backend.backend(),
            "keras": keras.__version__,
            "output": self.final_path,
        }
        self._write_info()
        self._started = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.info["wall_time_s"] = round(time.perf_counter() - self._started, 2)
        self.info["ended"] = _now()
        if exc_type is not None:
            self.info["status"] = "failed"
            self.info["error"] = "".join(traceback.format_exception_only(exc_type, exc)).strip()
            self._write_info()
            return False
        self.info["status"] = "finished"
        self._write_info()
        old = self.final_path.rstrip(os.sep) + ".old"
        if os.path.isdir(self.final_path):
            if os.path.isdir(old):
                shutil.rmtree(old)
            os.rename(self.final_path, old)
        os.rename(self.path, self.final_path)
        if os.path.isdir(old):
            shutil.rmtree(old)
        return False

    def _write_info(self):
        write_json(os.path.join(self.path, "run.json"), self.info)

    def note(self, **items):
        """Record extra facts (devices, parameters, notes) in ``run.json``."""
        self.info.update(items)
        self._write_info()

    def save_metrics(self, metrics):
        """Write ``metrics.json`` (and a copy into ``run.json``)."""
        write_json(os.path.join(self.path, "metrics.json"), metrics)
        self.note(metrics=metrics)

    def output_path(self, *parts):
        """Where a file of this run will be once it finishes (for printing)."""
        return os.path.join(self.final_path, *parts)

    def latest_checkpoint(self):
        """``(path, epoch)`` of the newest checkpoint in this run, or ``(None, 0)``."""
        found = []
        for path in glob.glob(os.path.join(self.checkpoint_dir, "epoch-*.keras")):
            m = re.search(r"epoch-(\d+)\.keras$", path)
            if m:
                found.append((int(m.group(1)), path))
        if not found:
            return None, 0
        epoch, path = max(found)
        return path, epoch

    def restore(self):
        """With ``--resume``: ``(model, epoch)`` from the latest checkpoint (the
        optimizer state included), else ``None``. Call inside the distribution scope."""
        if not getattr(self.args, "resume", False):
            return None
        path, epoch = self.latest_checkpoint()
        if path is None:
            raise RunError(f"--resume: no checkpoint in {self.checkpoint_dir}")
        self.resumed_from = path
        self.note(resumed_from=path, resumed_epoch=epoch)
        return keras.models.load_model(path), epoch


# -- training ------------------------------------------------------------------------


def callbacks(run, save_checkpoints=True):
    """ModelCheckpoint (every epoch) and TensorBoard (where it works) for `run`."""
    result = []
    if save_checkpoints:
        result.append(
            keras.callbacks.ModelCheckpoint(os.path.join(run.checkpoint_dir, CHECKPOINT_PATTERN))
        )
    import importlib.util

    # Keras writes TensorBoard logs with tf.summary, whose implementation ships in
    # the `tensorboard` package (TensorFlow >= 2.20 no longer depends on it).
    missing = [m for m in ("tensorflow", "tensorboard") if importlib.util.find_spec(m) is None]
    if missing:
        run.note(tensorboard=f"skipped: TensorBoard logs need {' and '.join(missing)} installed")
    else:
        result.append(keras.callbacks.TensorBoard(log_dir=run.log_dir, update_freq="epoch"))
    return result


def fit(model, train_data, args, run, validation_data=None, initial_epoch=0, extra_callbacks=()):
    """`model.fit` with the run's flags: epochs, steps per epoch, callbacks, verbosity.

    Returns the `keras.callbacks.History`; its ``history`` dict holds only this
    session's epochs (a resumed run starts at `initial_epoch`).
    """
    if initial_epoch >= args.epochs:
        raise RunError(
            f"The run already trained {initial_epoch} epoch(s); pass a larger --epochs to "
            f"continue it. Received: epochs={args.epochs}"
        )
    return model.fit(
        train_data,
        validation_data=validation_data,
        epochs=args.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=args.steps,
        callbacks=[*callbacks(run), *extra_callbacks],
        verbose=args.verbose,
        shuffle=False,  # the data pipeline shuffles
    )


def final_metrics(history, model=None, evaluation=None):
    """A flat metrics dict: the last epoch's values of `history` and `evaluation`."""
    metrics = {}
    for key, values in (history.history if history is not None else {}).items():
        if values:
            metrics[key] = float(values[-1])
    for key, value in (evaluation or {}).items():
        metrics[f"test_{key}"] = float(value)
    if model is not None:
        metrics["parameters"] = int(model.count_params())
    return metrics


# -- attention pictures --------------------------------------------------------------


def _attention_layers(model):
    from keras_attn import Attention

    return [
        layer
        for layer in model.layers
        if isinstance(layer, (Attention, keras.layers.MultiHeadAttention))
    ]


def attention_maps(model, inputs):
    """The attention weights of every attention layer of a functional `model` on `inputs`.

    Each layer is called again on the tensors it received in the model, with the
    same arguments plus ``return_attention_scores=True`` and ``training=False``.

    Returns:
        Dict ``{layer name: weights as numpy (B, H, Tq, Tk)}``, in model order.
    """
    maps = {}
    for layer in _attention_layers(model):
        node = layer._inbound_nodes[0]
        symbolic = node.arguments.keras_tensors
        probe = keras.Model(model.input, symbolic)
        values = probe(inputs, training=False)
        values = values if isinstance(values, (list, tuple)) else [values]
        by_id = {id(t): v for t, v in zip(symbolic, values, strict=True)}

        def fill(x):
            return by_id.get(id(x), x) if isinstance(x, keras.KerasTensor) else x

        args, kwargs = node.arguments.convert(fill)
        kwargs = {**kwargs, "return_attention_scores": True, "training": False}
        outputs = layer(*args, **kwargs)
        maps[layer.name] = keras.ops.convert_to_numpy(outputs[1]).astype("float32")
    return maps


def save_attention_heatmaps(model, inputs, directory, tokens=None, examples=2, max_heads=4):
    """Write one PNG per (attention layer, example) of `model` on `inputs` to `directory`.

    Args:
        tokens: Optional ``tokens[i]`` = labels of example i's positions.
        examples: How many examples of the batch to draw.
        max_heads: How many heads per layer to draw.

    Returns:
        The list of paths written.
    """
    from keras_attn import viz

    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, weights in attention_maps(model, inputs).items():
        for i in range(min(examples, weights.shape[0])):
            path = os.path.join(directory, f"{name}-example{i}.png")
            labels = tokens[i] if tokens is not None else None
            viz.plot_attention(
                weights[i, :max_heads], path, tokens=labels, title=f"{name}, example {i}"
            )
            paths.append(path)
    return paths


# -- entry point ---------------------------------------------------------------------


def main(parser, commands, argv=None):
    """Parse `argv`, then run ``commands[args.command](args)``.

    Known failures (`RunError`, dataset and component errors, ValueError) print
    ``error: ...`` and exit with status 2, without a traceback (unless the
    environment sets ``EXAMPLES_TRACEBACK=1``).
    """
    from examples.datasets import DatasetError
    from keras_attn.errors import PluginError

    args = parser.parse_args(argv)
    try:
        split_cpu(getattr(args, "cpu_devices", None))
        return commands[args.command](args)
    except (RunError, DatasetError, PluginError, ValueError) as e:
        if os.environ.get("EXAMPLES_TRACEBACK"):
            raise
        parser.exit(2, f"error: {e}\n(set EXAMPLES_TRACEBACK=1 for the traceback)\n")


# -- side by side with keras.layers.MultiHeadAttention -------------------------------------


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training step."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def side_by_side(build, attention, train_data, eval_data, epochs, steps, seed):
    """Train the model with `attention` and with `keras.layers.MultiHeadAttention`, in turn.

    Both models start from the same weights where their layouts match (they do
    for every softmax layer without extra weights) and see the same batches; they
    take turns epoch by epoch, so the load of a shared machine falls on both alike.

    Args:
        build: ``build(attention) -> compiled model``.
        train_data: ``train_data(epoch) -> dataset`` of at least `steps` batches.
        eval_data: Held-out dataset for `model.evaluate`.

    Returns:
        Dict: per model (``keras_attn``, ``keras``) the median step time in ms
        (compilation step excluded), the last training loss and the held-out
        metrics; ``step_time_ratio`` (keras_attn / keras) and ``wall_time_s``.
        Dropout draws differ between the two, so their losses drift apart a little.
    """
    started = time.perf_counter()
    models, timers, losses = {}, {}, {}
    for label, spec in (("keras_attn", attention), ("keras", {"layer": REFERENCE_LAYER})):
        keras.utils.set_random_seed(seed)
        models[label] = build(spec)
        timers[label], losses[label] = StepTimer(), []
    reference = models["keras"].get_weights()
    same_start = [w.shape for w in models["keras_attn"].get_weights()] == [
        w.shape for w in reference
    ]
    if same_start:
        models["keras_attn"].set_weights(reference)
    for epoch in range(epochs):
        for label, model in models.items():
            keras.utils.set_random_seed(seed + epoch)
            history = model.fit(
                train_data(epoch),
                epochs=1,
                steps_per_epoch=steps,
                callbacks=[timers[label]],
                verbose=0,
            )
            losses[label].append(float(history.history["loss"][-1]))
            print(f"epoch {epoch + 1} {label:>10}: loss {losses[label][-1]:.4f}", flush=True)
    rows = {}
    for label, model in models.items():
        times = timers[label].times[1:] or timers[label].times
        evaluation = model.evaluate(eval_data, verbose=0, return_dict=True)
        rows[label] = {
            "median_step_ms": 1000 * statistics.median(times),
            "train_loss": losses[label][-1],
            "train_loss_per_epoch": losses[label],
            **{f"test_{k}": float(v) for k, v in evaluation.items()},
        }
    return {
        "models": rows,
        "same_initial_weights": same_start,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "step_time_ratio": rows["keras_attn"]["median_step_ms"] / rows["keras"]["median_step_ms"],
    }


def print_side_by_side(result):
    rows = result["models"]
    print(
        f"\nstep time keras_attn / keras.layers.MultiHeadAttention: {result['step_time_ratio']:.3f} "
        f"(median {rows['keras_attn']['median_step_ms']:.1f} ms vs "
        f"{rows['keras']['median_step_ms']:.1f} ms)"
    )
    for label, row in rows.items():
        tests = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("test_"))
        print(f"{label:>10}: {tests}")
