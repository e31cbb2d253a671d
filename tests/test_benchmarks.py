"""The benchmark scripts: their counts of useful work, the merging of rounds, the report."""

import numpy as np
import pytest
from keras import ops

from benchmarks import matmul_shapes
from benchmarks import report
from benchmarks import run
from benchmarks import timing
from benchmarks import workload
from keras_attn import patterns
from keras_attn.positions import make_positions


def _pattern_pairs(pattern, length):
    mask = ops.convert_to_numpy(pattern.mask(make_positions(length, length, 1)))
    return int(np.broadcast_to(mask, (1, 1, length, length)).sum())


@pytest.mark.parametrize("length", [1, 7, 300, 600])
def test_allowed_pairs_count_what_the_patterns_allow(length):
    # The FLOP rates divide these counts by time: they must be the patterns' own.
    assert workload.allowed_pairs("dense", length) == _pattern_pairs(patterns.Causal(), length)
    local = patterns.Local(workload.WINDOW)
    assert workload.allowed_pairs("local", length) == _pattern_pairs(local, length)
    both = local | patterns.GlobalTokens(1)
    assert workload.allowed_pairs("local_global", length) == _pattern_pairs(both, length)


def test_useful_flops():
    pairs = workload.allowed_pairs("local", 1024)
    assert workload.useful_flops("local", 1024, projections=False) == 3 * pairs * 8 * 4 * 64
    projections = 3 * 4 * 2 * 1024 * 512 * 512
    assert (
        workload.useful_flops("local", 1024)
        == workload.useful_flops("local", 1024, False) + projections
    )


def test_merge_rounds_takes_the_median_time_and_the_largest_peak():
    def result(impl, time_s, peak, round_):
        spec = {"impl": impl, "case": "dense", "length": 256, "round": round_}
        return {**spec, "time_s": time_s, "peak_rss": peak, "load_before": 1.0}

    results = [
        result("keras_attn", 3.0, 10, 0),
        result("keras", 2.0, 11, 0),
        result("keras_attn", 1.0, 12, 1),
        result("keras", 2.0, 11, 1),
        result("keras_attn", 2.0, 11, 2),
        {"impl": "keras", "case": "dense", "length": 256, "round": 2, "error": "exit 1"},
    ]
    merged = run.merge_rounds(results)
    assert [(r["impl"], r["time_s"], r["peak_rss"]) for r in merged] == [
        ("keras_attn", 2.0, 12),
        ("keras", 2.0, 11),
    ]
    assert merged[0]["round_times_s"] == [3.0, 1.0, 2.0]


def test_report_states_which_targets_are_met(tmp_path):
    def r(impl, case, length, time_s, peak_gib, **extra):
        return {
            "impl": impl, "case": case, "length": length, "time_s": time_s,
            "peak_rss": peak_gib * 2**30, "load_before": 1.0, "path": "block_sparse", **extra,
        }  # fmt: skip

    results = [
        r("ref", "matmul", 2048, 2 * 2048**3 / 200e9, 1),  # 200 GFLOP/s
        r("keras_attn", "dense", 256, 1.0, 1),
        r("keras", "dense", 256, 1.1, 1),
        r("keras_attn", "local", 8192, 1.0, 1.5),
        r("keras", "local", 8192, 7.0, 9.0),
        r("keras_attn", "local", 65536, 8.5, 9.0),
        r("keras_attn", "core", 8192, 0.5, 1.5, computed_pairs=8 * 64 * 5 * 128 * 128),
    ]
    meta = {"machine": "m", "backend": "tensorflow", "backend_version": "x", "keras": "y"}
    report.write(results, {**meta, "date": "d", "duration_s": 60}, str(tmp_path))
    text = (tmp_path / "results.md").read_text()
    assert "Dense time ratio <= 1.0 at every T: **met** (worst 0.91" in text
    assert "at least 6x faster: **met** (7.0x); at most 1/5 the peak memory: **met**" in text
    assert "time(65536) / time(8192) <= 9: **met** (8.5" in text
    # Useful work counted from the pattern itself, over 0.5 s, against 200 GFLOP/s.
    rate = 3 * _pattern_pairs(patterns.Local(workload.WINDOW), 8192) * 8 * 4 * 64 / 0.5 / 1e9
    assert f"(200.0 GFLOP/s): **missed** (kernel best {rate:.1f} GFLOP/s = 25%" in text


def test_matmul_shapes_runs(capsys):
    matmul_shapes.main(["--length", "512", "--square", "64"])
    out = capsys.readouterr().out
    assert "| scores q·kᵀ (writes a slab) |" in out and "Bound on the kernel's useful rate" in out


def test_accelerators_counts_pairs_and_reports_ratios():
    from benchmarks import accelerators

    t, w = 1024, accelerators.WINDOW
    want = sum(min(i + 1, w) for i in range(t))  # causal window: keys i-w+1 .. i
    assert accelerators.allowed_pairs("local", t) == want
    assert accelerators.allowed_pairs("local_global", t) > want
    results = [
        {"backend": "jax", "kind": "keras_attn", "case": "local", "length": t,
         "time_s": 0.003, "path": "native"},
        {"backend": "jax", "kind": "best", "case": "local", "length": t, "time_s": 0.002},
        {"backend": "jax", "kind": "flash", "case": "local", "length": t, "error": "OOM"},
    ]  # fmt: skip
    meta = {"machine": "test", "backends": ["jax"], "cases": ["local"], "lengths": [t],
            "repeats": 1}  # fmt: skip
    row = [line for line in accelerators.report(results, meta).splitlines() if "| local |" in line]
    assert row == [f"| local | {t} | 3.00 (native) | 2.00 | 1.50 | OOM | "
                   f"{3 * want * 16 * 4 * 64 / 0.003 / 1e12:.1f} | — | — |"]  # fmt: skip


# -- the shared compile-and-time helper -------------------------------------------------


def test_time_passes_warms_up_then_times_as_asked(monkeypatch):
    def passes(durations, **kwargs):
        clock = iter(np.cumsum([0.0] + [d for d in durations for d in (d, 0.0)]))
        monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))
        calls = []
        result = timing.time_passes(lambda: calls.append(1), **kwargs)
        assert len(calls) == 1 + len(result.times)  # the warm-up pass is not timed
        return result

    # Warm-up 4 s, then 3 passes: the median and the fastest of those three.
    result = passes([4.0, 0.5, 0.25, 0.375], repeats=3)
    assert result.warmup_s == 4.0 and result.times == (0.5, 0.25, 0.375)
    assert result.median == 0.375 and result.min == 0.25
    # Short passes go on until they add up to min_seconds, at most max_repeats of them.
    assert len(passes([1.0] + [0.25] * 10, repeats=2, min_seconds=1.0, max_repeats=9).times) == 4
    assert len(passes([1.0] + [0.01] * 10, repeats=2, min_seconds=1.0, max_repeats=6).times) == 6
    # The budget stops the timing, even before `repeats` passes.
    assert passes([1.0, 3.0, 3.0, 3.0], repeats=5, budget_s=5.0).times == (3.0, 3.0)


def test_gradient_step_differentiates_the_arguments_and_the_variables(backend):
    import keras

    w = keras.Variable(np.array([1.0, 2.0, 3.0], "float32"))
    x = ops.convert_to_tensor(np.array([4.0, 5.0, 6.0], "float32"))
    step = timing.gradient_step(lambda x: ops.sum(x * w * w), x, variables=[w])
    out = step()
    d_x, d_w = np.array([1.0, 4.0, 9.0]), np.array([8.0, 20.0, 36.0])  # w², 2xw
    if backend == "jax":
        (d_w_got,), d_x_got = out
        np.testing.assert_allclose(np.asarray(d_x_got), d_x)
        np.testing.assert_allclose(np.asarray(d_w_got), d_w)
    elif backend == "tensorflow":  # each gradient's sum: no copy of the gradients is timed
        np.testing.assert_allclose([float(v) for v in out], [d_x.sum(), d_w.sum()])
    else:
        np.testing.assert_allclose(w.value.grad.cpu().numpy(), d_w)
    step()  # a second pass gives the same (PyTorch's gradients do not accumulate)
    if backend == "torch":
        np.testing.assert_allclose(w.value.grad.cpu().numpy(), d_w)


def test_compiled_step_runs_the_function(backend):
    a = ops.convert_to_tensor(np.arange(6, dtype="float32").reshape(2, 3))
    b = ops.convert_to_tensor(np.ones((3, 2), "float32"))
    out = timing.compiled_step(ops.matmul, a, b)()
    expected = np.arange(6).reshape(2, 3) @ np.ones((3, 2))
    if backend == "jax":
        np.testing.assert_allclose(np.asarray(out), expected)
    else:  # reduced to its sum where it was computed
        np.testing.assert_allclose([float(v) for v in out], [expected.sum()])


def test_distributed_reads_collectives_from_hlo_text():
    from benchmarks import distributed

    text = """
  %ag = f32[8,512]{1,0} all-gather(f32[1,512]{1,0} %p), dimensions={0}
  %cp-start = (bf16[2,64]{1,0}, bf16[2,64]{1,0}) collective-permute-start(bf16[2,64]{1,0} %x)
  %cp-done = bf16[2,64]{1,0} collective-permute-done(%cp-start)
  %ar = f32[] all-reduce(f32[] %s), to_apply=%add
"""
    assert distributed.collectives(text) == {
        "all-gather": {"count": 1, "bytes": 8 * 512 * 4},
        "collective-permute": {"count": 1, "bytes": 2 * 2 * 64 * 2},
        "all-reduce": {"count": 1, "bytes": 4},
    }


def test_distributed_smoke(tmp_path, backend):
    """`benchmarks.distributed` on 4 virtual devices at T=256: the ring exchanges K/V
    with collective-permutes and gathers nothing; the report has its tables."""
    if backend != "jax":
        pytest.skip("context parallelism runs on the JAX backend")
    import json
    import os
    import subprocess
    import sys

    output = tmp_path / "distributed.json"
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
    )
    argv = ["--max-length", "256", "--patterns", "causal", "--configs", "one_device,ring"]
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.distributed", *argv, "--output", str(output)],
        capture_output=True, text=True, env=env, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = {r["config"]: r for r in json.loads(output.read_text())["results"]}
    ring = results["ring"]
    assert ring["path"] == "context_parallel" and ring["devices"] == 4
    assert ring["collectives"]["collective-permute"]["count"] >= 3  # P - 1 hops of K and V
    assert "all-gather" not in ring["collectives"]
    assert 0 < ring["temp_bytes"] and 0 < results["one_device"]["temp_bytes"]
    assert "| ring |" in result.stdout and "Longest T" in result.stdout
