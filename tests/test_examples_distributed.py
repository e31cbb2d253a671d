"""The examples past one device (JAX): ``--distribute model_parallel`` and
``--context-parallel N`` build a ``data x seq x model`` mesh, and a tiny GPT and BERT
train on it as on one device, step by step; two local processes (JAX's multi-process
runtime, CPU collectives over the loopback through gloo) give the same losses.

The runs go through the examples' command lines (``main``) in subprocesses: JAX fixes
its device count (``XLA_FLAGS=--xla_force_host_platform_device_count``) and its
processes when it starts. ``--epochs 3 --steps 1`` makes each epoch's logged loss one
step's loss. The clear errors are checked in-process on every backend.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from examples.common import devices  # noqa: E402
from examples.common.run import RunError  # noqa: E402
from examples.gpt import __main__ as gpt_cli  # noqa: E402

TINY = ["--num-layers", "1", "--num-heads", "2", "--hidden-dim", "16", "--verbose", "0"]
STEPS = ["--epochs", "3", "--steps", "1", "--learning-rate", "0.01"]
# GPT on TFDS's mock tiny_shakespeare (a few short random strings: small and fast).
GPT = ["train", *TINY, *STEPS, "--seq-len", "8", "--batch-size", "4", "--sample-length", "0"]
GPT += ["--dataset", "tiny_shakespeare", "--no-download"]
GPT_MESH = ["--distribute", "model_parallel", "--context-parallel", "2"]  # data 2 x seq 2 x model 2
# BERT fine-tuned on the embedded pydoc_order task (padded texts: a key padding mask).
BERT = ["finetune", *TINY, *STEPS, "--max-length", "16", "--batch-size", "32", "--dropout", "0"]
BERT_MESH = ["--distribute", "data_parallel", "--context-parallel", "4"]  # data 2 x seq 4

# Runs `[(example, name, argv)]` given as JSON; prints, per name, the losses of each
# epoch, the context parallel strategies the attention layers ran and the run record.
SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import tensorflow_datasets as tfds
    from examples import datasets
    from examples.bert import __main__ as bert
    from examples.gpt import __main__ as gpt
    import keras_attn.context_parallel as context_parallel

    runs, data_dir = json.loads(sys.argv[1]), sys.argv[2]
    # Prepared before the runs: the run that prepares a dataset reads it in another order.
    datasets.embedded_builder_class("pydoc_order")(data_dir=data_dir).download_and_prepare()
    strategies = []
    run = context_parallel.run

    def recording_run(*args, **kwargs):
        result = run(*args, **kwargs)
        strategies.append(result[2].strategy)
        return result

    context_parallel.run = recording_run
    report = {}
    for example, name, argv in runs:
        strategies.clear()
        if example == "gpt":  # TFDS's mock tiny_shakespeare
            with tfds.testing.mock_data(num_examples=4):
                metrics = gpt.main([*argv, "--data-dir", data_dir])
        else:
            metrics = bert.main([*argv, "--data-dir", data_dir])
        output = argv[argv.index("--output") + 1]
        if "--process-id" in argv and argv[argv.index("--process-id") + 1] != "0":
            output += "-process" + argv[argv.index("--process-id") + 1]  # its own folder
        with open(os.path.join(output, "run.json")) as f:
            info = json.load(f)
        report[name] = {
            "losses": metrics["loss_per_epoch"],
            "strategies": sorted(set(strategies)),
            "distribution": info["distribution"],
            "context_parallel": info["attention"].get("context_parallel"),
            "status": info["status"],
            "warnings": info.get("warnings"),
            "notes": {k: info[k] for k in ("checkpoints", "optional_steps") if k in info},
        }
    print(json.dumps(report))
    """
)


def environment(device_count):
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        KERAS_BACKEND="jax",
        EXAMPLES_TRACEBACK="1",
        JAX_PLATFORMS="cpu",
        # Small programs: XLA's CPU backend at optimization level 0 compiles them fastest.
        XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count} "
        "--xla_backend_optimization_level=0",
    )


def start(runs, data_dir, device_count):
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, json.dumps(runs), str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=environment(device_count),
    )  # fmt: skip


def report_of(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def assert_same_losses(got, expected):
    assert len(got) == len(expected) == 3
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert abs(a - b) <= 1e-5 * abs(b), (step, got, expected)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_dir):
    """One device and the meshes, in one process with 8 devices."""
    if keras.backend.backend() != "jax":
        pytest.skip("model and context parallelism run on the JAX backend")
    out = tmp_path_factory.mktemp("runs")
    runs = [
        ("gpt", "gpt", [*GPT, "--output", str(out / "gpt")]),
        ("gpt", "gpt_mesh", [*GPT, *GPT_MESH, "--output", str(out / "gpt_mesh")]),
        ("bert", "bert", [*BERT, "--output", str(out / "bert")]),
        ("bert", "bert_mesh", [*BERT, *BERT_MESH, "--output", str(out / "bert_mesh")]),
    ]
    return report_of(start(runs, data_dir, 8))


@pytest.mark.slow
def test_gpt_on_a_data_seq_model_mesh_trains_as_on_one_device(one_process):
    one, mesh = one_process["gpt"], one_process["gpt_mesh"]
    assert mesh["distribution"] == (
        "model_parallel over 8 device(s), mesh data 2 x seq 2 x model 2"
    )
    assert mesh["context_parallel"] == {"axis": "seq", "strategy": "auto", "heads_axis": "model"}
    assert mesh["strategies"] == ["ring"] and one["strategies"] == []
    assert mesh["status"] == "finished" and mesh["warnings"] is None  # heatmaps ran
    assert_same_losses(mesh["losses"], one["losses"])


@pytest.mark.slow
def test_bert_with_padding_on_a_data_seq_mesh_trains_as_on_one_device(one_process):
    one, mesh = one_process["bert"], one_process["bert_mesh"]
    assert mesh["distribution"] == "data_parallel over 8 device(s), mesh data 2 x seq 4 x model 1"
    assert mesh["strategies"] == ["ring"] and one["strategies"] == []
    assert mesh["status"] == "finished" and mesh["warnings"] is None
    assert_same_losses(mesh["losses"], one["losses"])


@pytest.mark.slow
def test_two_processes_over_the_loopback_train_as_one(one_process, data_dir, tmp_path):
    """The GPT mesh of 8 devices as two processes of 4, talking through gloo."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [*GPT, *GPT_MESH, "--output", str(tmp_path / "gpt")]
    flags += ["--num-processes", "2", "--coordinator", f"127.0.0.1:{port}"]
    processes = [
        start([("gpt", "gpt", [*flags, "--process-id", str(i)])], data_dir, 4) for i in (0, 1)
    ]
    reports = [report_of(p) for p in processes]
    for i, report in enumerate(reports):
        run = report["gpt"]
        where = f"process {i}"
        assert run["distribution"].endswith("mesh data 2 x seq 2 x model 2, 2 processes"), where
        assert run["strategies"] == ["ring"], where
        assert run["notes"]["checkpoints"].startswith("none"), where
        assert_same_losses(run["losses"], one_process["gpt"]["losses"])
    assert (tmp_path / "gpt" / "run.json").exists()
    assert (tmp_path / "gpt-process1" / "run.json").exists()


# -- clear errors (every backend, in-process) ---------------------------------------


def test_other_backends_say_what_to_use_instead(backend):
    if backend == "jax":
        pytest.skip("JAX runs the meshes")
    for name, cp in (("model_parallel", 1), ("data_parallel", 2)):
        with pytest.raises(RunError, match="need the JAX backend.*mirrored, tpu or multiworker"):
            devices.distribution(name, context_parallel=cp)
    with pytest.raises(RunError, match="--num-processes needs the JAX backend"):
        devices.initialize_processes(2, 0, "127.0.0.1:1234")


def test_flags_that_cannot_work_together(backend):
    if backend == "jax":
        with pytest.raises(RunError, match="pass --distribute data_parallel"):
            devices.distribution("none", context_parallel=2)
        with pytest.raises(RunError, match="do not split into --context-parallel 3"):
            devices.distribution("model_parallel", context_parallel=3)  # one device here
        with pytest.raises(RunError, match="--process-id must be one of 0..1"):
            devices.initialize_processes(2, 2, "127.0.0.1:1234")
    parser = gpt_cli.make_parser()
    for extra, message in (
        (["--seq-len", "10", "--context-parallel", "4"], "--seq-len 10 does not split"),
        (["--seq-len", "8", "--context-parallel", "2", "--dropout", "0.1"], "--dropout 0"),
    ):
        args = parser.parse_args(["train", *extra])
        with pytest.raises(ValueError, match=message):
            gpt_cli.check_args(args)
    with pytest.raises(ValueError, match="takes no context_parallel"):
        from examples.common.attention import AttentionConfig

        AttentionConfig(layer="keras", context_parallel={"axis": "seq"})
