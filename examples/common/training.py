"""The train recipe every example follows, written once.

    metrics = training.train(args, "vit", load_data=ImageData, build_model=build, summary=...)

1. The attention flags, the flags and the output folder are checked before any
   data is read (``--resume`` past the last epoch fails here, leaving nothing).
2. Precision, seed and devices are set; the data is loaded (`Data`).
3. In the run folder (`examples.common.run.Run`) and the devices' scope: the
   model comes from the latest checkpoint (``--resume``) or `build_model`; it
   trains (`fit`: checkpoints every epoch, ``history.csv``, TensorBoard logs) and
   is evaluated on the held-out data.
4. The metrics are saved (``loss_per_epoch`` holds every epoch the model has
   trained, resumed runs included): from here on the run has its result.
5. Optional steps (samples, pictures) run last, outside the devices' scope (and
   off the mesh of ``model_parallel`` / ``--context-parallel``), each through
   `Run.optional`: one that fails is recorded as a warning in ``run.json`` and the
   run still finishes.

Across processes (``--num-processes``, JAX) every process trains its part of each
step; no checkpoints are written (a weight spread over several processes is not
whole in any one of them) and the optional steps are left out.
"""

import importlib.util
import os
import time

import keras

from examples.common.cli import attention_from_args
from examples.common.devices import configure_precision
from examples.common.devices import distribution
from examples.common.run import CHECKPOINT_PATTERN
from examples.common.run import Run


class Data:
    """What the recipes need of an example's data; each example subclasses it.

    Attributes:
        facts: Dict of facts about the data (sizes, classes, baselines), recorded in
            ``run.json`` under ``data`` and added to the metrics.
        validate: Whether `fit` also evaluates the test data after every epoch.
        tokenizer: Saved in the run folder as ``tokenizer.json`` where not None.
    """

    facts = {}
    validate = False
    tokenizer = None
    tokens_per_step = None  # tokens in one training batch, for ``train_tokens_per_s``

    def train_dataset(self, seed, repeat):
        """Batches of ``(inputs, labels[, weights])`` shuffled with `seed`, endless if `repeat`."""
        raise NotImplementedError

    def test_dataset(self):
        """Held-out batches, in order."""
        raise NotImplementedError

    def steps_per_epoch(self):
        """Steps of one pass over the training data."""
        raise NotImplementedError


class Throughput(keras.callbacks.Callback):
    """Training speed: the wall time of every training step but the first (which compiles).

    Args:
        tokens_per_step: Tokens in one training batch.

    Attributes:
        tokens_per_s: Tokens of the timed steps over their total wall time (None
            before a second step).
    """

    def __init__(self, tokens_per_step):
        super().__init__()
        self.tokens_per_step = tokens_per_step
        self.seconds, self.steps, self._compiled = 0.0, 0, False

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if logs and "loss" in logs:
            float(logs["loss"])  # wait for the step: JAX dispatches it asynchronously
        elapsed = time.perf_counter() - self._start
        if not self._compiled:
            self._compiled = True
            return
        self.seconds += elapsed
        self.steps += 1

    @property
    def tokens_per_s(self):
        if not self.steps:
            return None
        return self.steps * self.tokens_per_step / self.seconds


def callbacks(run, save_checkpoints=True):
    """ModelCheckpoint (every epoch), CSVLogger and TensorBoard (where it works) for `run`."""
    result = []
    if save_checkpoints:
        result.append(
            keras.callbacks.ModelCheckpoint(os.path.join(run.checkpoint_dir, CHECKPOINT_PATTERN))
        )
    result.append(keras.callbacks.CSVLogger(run.history_path, append=True))
    # Keras writes TensorBoard logs with tf.summary, whose implementation ships in
    # the `tensorboard` package (TensorFlow >= 2.20 no longer depends on it).
    missing = [m for m in ("tensorflow", "tensorboard") if importlib.util.find_spec(m) is None]
    if missing:
        run.note(tensorboard=f"skipped: TensorBoard logs need {' and '.join(missing)} installed")
    else:
        result.append(keras.callbacks.TensorBoard(log_dir=run.log_dir, update_freq="epoch"))
    return result


def fit(
    model,
    train_data,
    args,
    run,
    validation_data=None,
    initial_epoch=0,
    extra_callbacks=(),
    save_checkpoints=True,
):
    """`model.fit` with the run's flags: epochs, steps per epoch, callbacks, verbosity.

    Returns the `keras.callbacks.History`; its ``history`` dict holds only this
    session's epochs (a resumed run starts at `initial_epoch`; `Run.history` has all).
    """
    return model.fit(
        train_data,
        validation_data=validation_data,
        epochs=args.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=args.steps,
        callbacks=[*callbacks(run, save_checkpoints), *extra_callbacks],
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


def train(
    args,
    example,
    load_data,
    build_model,
    summary,
    conclude=None,
    optional_steps=None,
    notes=None,
):
    """Train (or resume) one model and write its run folder; returns the metrics.

    Args:
        args: The parsed flags (`examples.common.cli.make_parser`), already checked
            by the example.
        example: The run's name in ``run.json`` (``"gpt"``, ``"bert-pretrain"``).
        load_data: ``load_data(args) -> Data``.
        build_model: ``build_model(args, attention, data) -> compiled model``
            (`attention`: the `examples.common.attention.AttentionConfig` of the flags).
        summary: ``summary(model, data) -> str``, printed before training.
        conclude: Optional ``conclude(metrics, data) -> dict`` of more metrics
            (it may print them).
        optional_steps: Optional ``optional_steps(model, data, run) -> {name: step}``
            of calls without arguments that may fail without failing the run.
        notes: Optional dict of more facts for ``run.json``.
    """
    attention = attention_from_args(args)  # checked before anything else
    run = Run(args, example)
    run.check()  # bad flags and folders fail before any data is read
    configure_precision(args.mixed_precision)
    keras.utils.set_random_seed(args.seed)
    dist = distribution(
        args.distribute,
        context_parallel=getattr(args, "context_parallel", 1),
        model_parallel=getattr(args, "model_parallel", None),
        heads=(getattr(args, "num_heads", None), attention.num_key_value_heads),
    )
    one_process = dist.num_processes == 1
    data = load_data(args)
    train_ds = data.train_dataset(args.seed, repeat=args.steps is not None)
    test_ds = dist.held_out(data.test_dataset(), args.batch_size)

    with run:
        run.note(
            distribution=dist.describe(),
            attention=attention.to_dict(),
            data=data.facts,
            **(notes or {}),
        )
        if dist.needs_full_batches:
            run.note(
                evaluation=f"full batches of {args.batch_size} only: {dist.name} splits "
                f"each batch over {dist.num_replicas} devices"
            )
        if not one_process:
            run.note(
                checkpoints=f"none: {dist.num_processes} processes hold parts of the weights",
                optional_steps="left out across processes",
            )
        if data.tokenizer is not None:
            data.tokenizer.save(os.path.join(run.path, "tokenizer.json"))
        with dist.scope():
            model, initial_epoch = run.restore() or (build_model(args, attention, data), 0)
            dist.check(model)
            print(f"{example}: {summary(model, data)}; devices: {dist.describe()}")
            throughput = [Throughput(data.tokens_per_step)] if data.tokens_per_step else []
            history = fit(
                model,
                train_ds,
                args,
                run,
                validation_data=test_ds if data.validate else None,
                initial_epoch=initial_epoch,
                extra_callbacks=throughput,
                save_checkpoints=one_process,
            )
            evaluation = model.evaluate(test_ds, verbose=0, return_dict=True)
        metrics = final_metrics(history, model, evaluation)
        metrics.update(data.facts)
        metrics["loss_per_epoch"] = run.history().get("loss", [])
        if throughput:
            # Training steps of this session, the first (compiling) one excluded.
            metrics["train_tokens_per_s"] = throughput[0].tokens_per_s
        if conclude is not None:
            metrics.update(conclude(metrics, data))
        run.save_metrics(metrics)
        steps = optional_steps(model, data, run) if optional_steps and one_process else {}
        with dist.outside():
            for name, step in steps.items():
                run.optional(name, step)
    print(f"\nrun finished: {run.final_path}")
    written = ("metrics.json", "history.csv", "attention", "checkpoints", "logs", "run.json")
    for item in written:
        print(f"  {run.output_path(item)}")
    return metrics
