"""Every example, with every --mixed-precision and every --distribute option of the backend,
trains a step and finishes its run, and the optional steps after training (GPT's
sample, heatmaps) work in every setting."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
EXAMPLES = ("gpt", "bert", "vit")
DISTRIBUTE = {
    "tensorflow": ("none", "mirrored", "multiworker"),
    "jax": ("none", "data_parallel"),
}

# One process per --distribute value: splitting the CPU into devices (TensorFlow),
# XLA's device count (JAX) and MultiWorkerMirroredStrategy must come before anything
# else runs. It runs the (example, precision) pairs given as JSON.
SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from examples.bert import __main__ as bert
    from examples.gpt import __main__ as gpt
    from examples.vit import __main__ as vit

    out, data_dir, distribute, runs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    tiny = ["--num-layers", "1", "--num-heads", "2", "--hidden-dim", "16", "--batch-size", "64"]
    common = [
        "--epochs", "1", "--steps", "1", "--verbose", "0", "--data-dir", data_dir,
        "--distribute", distribute, *tiny,
    ]
    if distribute == "mirrored":
        common += ["--cpu-devices", "2"]
    commands = {
        "gpt": (gpt.main, ["train", "--seq-len", "16", "--sample-length", "8"]),
        "bert": (bert.main, ["finetune", "--max-length", "16"]),
        "vit": (vit.main, ["train"]),
    }
    errors = {}
    for name, precision in runs:
        main, command = commands[name]
        flags = [] if precision == "float32" else ["--mixed-precision", precision]
        try:
            main([*command, *common, *flags, "--output", os.path.join(out, f"{name}-{precision}")])
        except Exception as e:
            errors[f"{name}-{precision}"] = f"{type(e).__name__}: {e}"[:2000]
    print(json.dumps(errors))
    """
)


def runs_of(distribute, options):
    """The (example, precision) pairs to run with `distribute`, so that every pair of
    (example, precision, distribution) values runs together at least once, with few runs.

    Each option runs every example once, with the precisions in turn (a Latin square:
    example i gets precision i + the option's index). The (example, precision) pairs
    that no option ran that way also run without distribution: none on TensorFlow
    (three options cover all nine), three on JAX (two options cover six).
    """

    def square(option):
        shift = options.index(option)
        return [(e, PRECISIONS[(i + shift) % len(PRECISIONS)]) for i, e in enumerate(EXAMPLES)]

    if distribute != "none":
        return square(distribute)
    covered = {pair for option in options for pair in square(option)}
    missing = [(e, p) for e in EXAMPLES for p in PRECISIONS if (e, p) not in covered]
    return square("none") + missing


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.slow
@pytest.mark.parametrize("distribute", sorted({d for ds in DISTRIBUTE.values() for d in ds}))
def test_every_example_finishes_with_every_precision_and_distribution(
    backend, distribute, data_dir, tmp_path
):
    if distribute not in DISTRIBUTE.get(backend, ()):
        pytest.skip(f"--distribute {distribute} is not an option on {backend}")
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        KERAS_BACKEND=backend,
        EXAMPLES_TRACEBACK="1",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",  # read when JAX starts
    )
    env.pop("TF_CONFIG", None)  # multiworker: one worker, this process
    runs = runs_of(distribute, DISTRIBUTE[backend])
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), data_dir, distribute, json.dumps(runs)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert not errors, errors
    for example, precision in runs:
        folder = tmp_path / f"{example}-{precision}"
        info = json.loads((folder / "run.json").read_text())
        where = f"{example}, {precision}, --distribute {distribute}"
        assert info["status"] == "finished", where
        assert "warnings" not in info, (where, info.get("warnings"))  # optional steps worked
        assert (folder / "metrics.json").exists(), where
        assert list((folder / "attention").glob("*.png")), where
        if example == "gpt":
            assert (folder / "sample.txt").read_text().strip(), where
