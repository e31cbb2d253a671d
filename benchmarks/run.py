"""Side-by-side speed and memory of keras_attn against keras.layers.MultiHeadAttention.

Run ``python -m benchmarks.run`` (``--quick`` for a short check, ``--help`` for sizes).
Every measurement runs in its own subprocess, so that its peak resident memory
(``resource.getrusage``) is its own. Each one times a forward+backward pass (gradients
of the summed output with respect to the inputs and all weights) after one warm-up
pass that traces and compiles. Batch 1, 8 heads, key_dim 64 (model width 512).

Cases:
- ``dense``: keras_attn.MultiHeadAttention vs keras.layers.MultiHeadAttention, causal.
- ``local``: keras_attn.LocalAttention(window=256) vs
  keras.layers.MultiHeadAttention(sliding_window=256); Keras only where it fits.
- ``local_global``: keras_attn with ``local(256) | global_tokens(1)``.
- ``core``: the block-sparse kernel alone (no projections), for the FLOP rate.
- ``matmul``: this machine's dense float32 matmul rate, the reference.

Writes ``results.md`` (tables, ratios, targets) and ``results.png`` (time and memory
against T, log-log) into ``--out`` (default: this folder), and ``results.json``.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from benchmarks import timing
from benchmarks.workload import BASE_BYTES
from benchmarks.workload import DENSE_SIZES
from benchmarks.workload import HEADS
from benchmarks.workload import KERAS_BYTES_PER_SCORE
from benchmarks.workload import KEY_DIM
from benchmarks.workload import LOCAL_GLOBAL_SIZES
from benchmarks.workload import LOCAL_SIZES
from benchmarks.workload import WIDTH
from benchmarks.workload import WINDOW

# -- one measurement (child process) --------------------------------------------------


def _rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _make_layer(spec):
    import keras

    import keras_attn
    from keras_attn import patterns

    impl, case = spec["impl"], spec["case"]
    if impl == "keras":
        window = WINDOW if case == "local" else None
        return keras.layers.MultiHeadAttention(HEADS, KEY_DIM, sliding_window=window)
    if case == "dense":
        return keras_attn.MultiHeadAttention(HEADS, KEY_DIM)
    if case == "local":
        return keras_attn.LocalAttention(window=WINDOW, num_heads=HEADS, key_dim=KEY_DIM)
    pattern = patterns.Local(WINDOW) | patterns.GlobalTokens(1)
    return keras_attn.Attention(num_heads=HEADS, key_dim=KEY_DIM, pattern=pattern)


def _layer_step(spec):
    """A compiled forward+backward step of the layer (gradients of the summed output
    with respect to the input and the weights), and the layer."""
    import keras

    layer = _make_layer(spec)
    x = keras.random.normal((1, spec["length"], WIDTH), seed=0)
    causal = spec["case"] == "dense"
    layer(x, x, use_causal_mask=causal)  # build

    def loss(x):
        return keras.ops.sum(layer(x, x, use_causal_mask=causal))

    return timing.gradient_step(loss, x, variables=layer.trainable_variables), layer


def _core_step(spec):
    """Forward+backward of the block-sparse kernel alone on (1, 8, T, 64) heads."""
    import keras

    from keras_attn import block_layout
    from keras_attn import block_sparse
    from keras_attn import normalizers
    from keras_attn import patterns
    from keras_attn import scores
    from keras_attn.components import Components
    from keras_attn.positions import make_positions

    t, block_size = spec["length"], spec.get("block_size", 128)
    shape = (1, HEADS, t, KEY_DIM)
    q, k, v = (keras.random.normal(shape, seed=i) for i in range(3))
    pattern = patterns.Local(WINDOW)
    components = Components(scores.ScaledDot(), (), pattern, normalizers.Softmax())
    positions = make_positions(t, t, HEADS)
    layout = block_layout.block_layout(pattern, t, t, block_size)

    def loss(q, k, v):
        out, _ = block_sparse.block_sparse_attention(q, k, v, layout, components, positions)
        return keras.ops.sum(out)

    # Pairs computed per head, the padding of partial blocks included.
    spec["computed_pairs"] = layout.computed_blocks * block_size**2
    return timing.gradient_step(loss, q, k, v)


def _matmul_step(spec):
    import keras

    n = spec["length"]
    a = keras.random.normal((n, n), seed=0)
    b = keras.random.normal((n, n), seed=1)
    return timing.compiled_step(keras.ops.matmul, a, b)


def measure(spec):
    """Time `spec` and report its peak memory: runs inside the child process."""
    import resource

    layer = None
    if spec["case"] == "matmul":
        step = _matmul_step(spec)
    elif spec["case"] == "core":
        step = _core_step(spec)
    else:
        step, layer = _layer_step(spec)
    base_rss = _rss_bytes()
    # One warm-up pass (tracing and compilation), then at least `max_repeats` passes
    # and at least a second of them (short passes are noisy), at most 50, and no
    # more once `budget_s` seconds are spent.
    passes = timing.time_passes(
        step,
        repeats=spec.get("max_repeats", 5),
        min_seconds=1.0,
        max_repeats=50,
        budget_s=spec.get("budget_s", 20.0),
    )
    path = getattr(layer, "last_path", None) if spec["impl"] == "keras_attn" else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        **spec,
        "time_s": passes.median,
        "min_time_s": passes.min,
        "repeats": len(passes.times),
        "warmup_s": passes.warmup_s,
        "peak_rss": peak,
        "base_rss": base_rss,
        "path": path,
        "load_after": os.getloadavg()[0],
    }


# -- the driver (parent process) ------------------------------------------------------


def run_child(spec, timeout):
    cmd = [sys.executable, "-m", "benchmarks.run", "--child", json.dumps(spec)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    load = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout} s", "load_before": load}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT ") :]), "load_before": load}
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else " / ".join(tail)
    return {**spec, "error": f"exit {proc.returncode}: {reason}", "load_before": load}


def merge_rounds(results):
    """One result per (impl, case, length): the median time over rounds, the largest peak."""
    merged, order = {}, []
    for r in results:
        key = (r["impl"], r["case"], r["length"])
        if key not in merged:
            order.append(key)
            merged[key] = []
        merged[key].append(r)
    out = []
    for key in order:
        rounds = merged[key]
        ok = [r for r in rounds if "time_s" in r]
        if len(rounds) == 1 or not ok:
            out.append(rounds[0])
            continue
        out.append(
            {
                **ok[0],
                "time_s": statistics.median(r["time_s"] for r in ok),
                "round_times_s": [r["time_s"] for r in ok],
                "peak_rss": max(r["peak_rss"] for r in ok),
                "load_before": max(r["load_before"] for r in ok),
            }
        )
    return out


def keras_fits(length, available):
    need = KERAS_BYTES_PER_SCORE * HEADS * length * length + BASE_BYTES
    return need <= 0.85 * available, need


def available_memory():
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info["MemTotal"])


def machine_name():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) / 2**20
    return f"{cpu}, {os.cpu_count()} cores, {total:.0f} GiB RAM, {platform.system()}"


def plan(args):
    dense = args.dense_sizes
    local = args.local_sizes
    lg = [t for t in args.local_global_sizes if t]
    specs = [{"impl": "ref", "case": "matmul", "length": args.matmul_size}]
    for t in dense:
        # Alternate the two several times: they run the same fused kernel, so their
        # difference is small and drift of the machine would otherwise decide it.
        for round_ in range(args.rounds):
            for impl in ("keras_attn", "keras"):
                specs.append({"impl": impl, "case": "dense", "length": t, "round": round_})
    for t in local:
        specs.append({"impl": "keras_attn", "case": "local", "length": t})
        specs.append({"impl": "keras", "case": "local", "length": t})
        specs.append({"impl": "keras_attn", "case": "core", "length": t})
    for t in lg:
        specs.append({"impl": "keras_attn", "case": "local_global", "length": t})
    for s in specs:
        s.update(budget_s=args.budget, max_repeats=args.repeats, backend=args.backend)
    return specs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="A few small sizes, one repeat.")
    parser.add_argument("--dense-sizes", type=_sizes, default=DENSE_SIZES)
    parser.add_argument("--local-sizes", type=_sizes, default=LOCAL_SIZES)
    parser.add_argument("--local-global-sizes", type=_sizes, default=LOCAL_GLOBAL_SIZES)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5, help="Fewest timed passes per size.")
    parser.add_argument(
        "--rounds", type=int, default=3, help="Alternating processes per dense size and layer."
    )
    parser.add_argument("--budget", type=float, default=20.0, help="Seconds of timing per size.")
    parser.add_argument("--timeout", type=float, default=1800.0, help="Seconds per measurement.")
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "tensorflow"))
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        os.environ["KERAS_BACKEND"] = spec["backend"]
        print("RESULT " + json.dumps(measure(spec)), flush=True)
        return
    os.environ["KERAS_BACKEND"] = args.backend
    if args.quick:
        args.dense_sizes, args.local_sizes = (256, 1024), (1024, 4096)
        args.local_global_sizes, args.matmul_size = (4096,), 1024
        args.repeats, args.budget, args.rounds = 1, 5.0, 1
    results = []
    started = time.time()
    for spec in plan(args):
        label = f"{spec['impl']:>10} {spec['case']:>12} T={spec['length']:<6}"
        if spec["impl"] == "keras" and spec["case"] == "local":
            fits, need = keras_fits(spec["length"], available_memory())
            if not fits:
                results.append({**spec, "skipped": f"needs about {need / 1e9:.0f} GB"})
                print(f"{label} skipped: would need about {need / 1e9:.0f} GB", flush=True)
                continue
        r = run_child(spec, args.timeout)
        results.append(r)
        if "error" in r:
            print(f"{label} failed: {r['error']}", flush=True)
        else:
            print(
                f"{label} {r['time_s']:8.3f} s  peak {r['peak_rss'] / 2**30:6.2f} GiB  "
                f"path={r['path']}  load={r['load_before']:.1f}",
                flush=True,
            )
    meta = {
        "machine": machine_name(),
        "backend": args.backend,
        "keras": _version("keras"),
        "backend_version": _version("tensorflow" if args.backend == "tensorflow" else "jax"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "duration_s": time.time() - started,
        "quick": args.quick,
    }
    results = merge_rounds(results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    from benchmarks import report

    report.write(results, meta, args.out)
    print(f"wrote {args.out}/results.md and results.png")


def _sizes(text):
    return tuple(int(t) for t in text.split(",") if t.strip())


def _version(module):
    try:
        from importlib.metadata import version

        return version(module if module != "tensorflow" else "tensorflow-cpu")
    except Exception:
        return "?"


if __name__ == "__main__":
    main()
