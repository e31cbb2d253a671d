"""Side by side with `keras.layers.MultiHeadAttention`: the ``compare`` command of every example.

`compare` builds the same model twice, with the attention of the flags and with
Keras's own layer, from the same seed (and the same weights where their layouts
match), and trains them on the same batches taking turns epoch by epoch, so the
load of a shared machine falls on both alike. It reports the median step time
of each (the compiling step excluded), their losses and held-out metrics, and
writes them to ``metrics.json`` of a run folder whose ``run.json`` holds the
wall time of the whole comparison.
"""

import statistics
import time

import keras

from examples.common.attention import REFERENCE_LAYER
from examples.common.attention import AttentionConfig
from examples.common.cli import attention_from_args
from examples.common.run import Run


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
        build: ``build(attention) -> compiled model``, given an
            `examples.common.attention.AttentionConfig`.
        train_data: ``train_data(epoch) -> dataset`` of at least `steps` batches.
        eval_data: Held-out dataset for `model.evaluate`.

    Returns:
        ``(result, models)``. `result` is a dict: per model (``keras_attn``,
        ``keras``) the median step time in ms (compilation step excluded), the
        training loss of every epoch and the held-out metrics; ``step_time_ratio``
        (keras_attn / keras) and ``wall_time_s``. `models` holds the two trained
        models by the same labels. Dropout draws differ between the two, so their
        losses drift apart a little.
    """
    started = time.perf_counter()
    models, timers, losses = {}, {}, {}
    for label, spec in (("keras_attn", attention), ("keras", AttentionConfig(REFERENCE_LAYER))):
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
                shuffle=False,
            )
            losses[label].append(float(history.history["loss"][-1]))
            print(f"epoch {epoch + 1} {label:>10}: loss {losses[label][-1]:.4f}", flush=True)
    rows = {}
    for label, model in models.items():
        times = timers[label].times[1:] or timers[label].times  # the first step compiles
        evaluation = model.evaluate(eval_data, verbose=0, return_dict=True)
        rows[label] = {
            "median_step_ms": 1000 * statistics.median(times),
            "train_loss": losses[label][-1],
            "train_loss_per_epoch": losses[label],
            **{f"test_{k}": float(v) for k, v in evaluation.items()},
        }
    result = {
        "models": rows,
        "same_initial_weights": same_start,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "step_time_ratio": rows["keras_attn"]["median_step_ms"] / rows["keras"]["median_step_ms"],
    }
    return result, models


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


def compare(args, example, load_data, build_model, model_flags, after=None):
    """The ``compare`` command: `side_by_side` in a run folder (always overwritten).

    Args:
        args: The parsed flags, already checked by the example.
        example: The run's name in ``run.json`` (``"gpt-compare"``).
        load_data: ``load_data(args) -> examples.common.training.Data``.
        build_model: ``build_model(args, attention, data) -> compiled model``.
        model_flags: Names of the flags that shape the model, recorded in the result.
        after: Optional ``after(models, data) -> dict`` of more results (e.g.
            generation speed), given the two trained models.

    Returns:
        The result dict of `side_by_side`, with the run's settings.
    """
    attention = attention_from_args(args)
    args.overwrite = True
    run = Run(args, example)
    run.check()
    keras.utils.set_random_seed(args.seed)
    data = load_data(args)
    steps = args.steps or data.steps_per_epoch()
    with run:
        result, models = side_by_side(
            lambda spec: build_model(args, spec, data),
            attention,
            lambda epoch: data.train_dataset(args.seed + epoch, repeat=True),
            data.test_dataset(),
            args.epochs,
            steps,
            args.seed,
        )
        result.update(
            backend=keras.backend.backend(),
            dataset=args.dataset,
            steps=steps * args.epochs,
            batch_size=args.batch_size,
            attention=attention.to_dict(),
            model={k: getattr(args, k) for k in model_flags},
            data=data.facts,
        )
        print_side_by_side(result)
        if after is not None:
            result.update(after(models, data))
        run.save_metrics(result)
    print(f"results: {run.output_path('metrics.json')}")
    return result
