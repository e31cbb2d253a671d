"""Attention past one device: per-device memory and collectives of context parallelism.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \\
        python -m benchmarks.distributed                      # T = 4096 ... 65536
    python -m benchmarks.distributed --max-length 8192 --budget-gib 1   # a quick run
    python -m benchmarks.distributed --cap gspmd:causal=8192 # what README.md shows
    python -m benchmarks.distributed --configs ring,halo     # only these, the rest kept
    python -m benchmarks.distributed --time 5                # also tokens/s (real devices)

One attention layer (batch 1, 8 heads, key_dim 64, width 512, float32), a training
step (forward and backward: the gradients of the inputs and the weights), its input
sharded along T over a mesh axis ``seq`` of every device. For each pattern (causal,
and a causal sliding window of 256) and T, the same layer is compiled:

- ``gspmd``: keras_attn without context parallelism; XLA's partitioner (GSPMD)
  decides how the sharded sequence meets the attention;
- ``ring``, ``all_gather``, ``halo``: `keras_attn.ContextParallel(axis="seq",
  strategy=...)` (``halo`` where keras_attn implements it; the local pattern only);
- ``keras``: `keras.layers.MultiHeadAttention` (``use_causal_mask``, and
  ``sliding_window`` for the local pattern), sequence-sharded by GSPMD;
- ``one_device``: keras_attn on one device (the path it chooses), and ``keras_one``:
  Keras's layer on one device.

Nothing runs (unless ``--time``): each step is only compiled, and the numbers are the
compiler's. Per device: ``temp`` (``compiled.memory_analysis().temp_size_in_bytes``,
the step's scratch memory; arguments and outputs are the same for all and left
out), and from the compiled HLO text the collectives: count per kind
(all-gather, all-reduce, collective-permute, reduce-scatter, all-to-all) and the
bytes of their results (what a device receives, about; an all-reduce's result is
the size of what it reduces). Ops in a loop body are counted once. The longest T
whose ``temp`` fits ``--budget-gib`` is given for one device and for 8.

The virtual devices are one CPU's: memory and collectives are the program's, not a
measurement of a network. On real GPUs or TPUs ``--time`` adds the step's time and
tokens/s; it has not been run on such a mesh yet. Writes ``results-distributed.json``
and prints Markdown tables (`benchmarks/README.md` holds a copy).
"""

import argparse
import json
import os
import re
import sys
import time

import numpy as np

HEADS, KEY_DIM, WIDTH, WINDOW = 8, 64, 512, 256
LENGTHS = (4096, 8192, 16384, 32768, 65536)
PATTERNS = ("causal", "local")
CONFIGS = {
    "causal": ("one_device", "keras_one", "gspmd", "keras", "ring", "all_gather"),
    "local": ("one_device", "keras_one", "gspmd", "keras", "ring", "halo", "all_gather"),
}
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "reduce-scatter", "all-to-all")
_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
_BYTES.update({"f64": 8, "s64": 8, "u64": 8})


def collectives(hlo_text):
    """``{kind: {"count": n, "bytes": b}}`` of the collectives in compiled HLO text.

    Bytes are the results' (tuples summed); the ``-start`` half of an asynchronous
    pair is counted, its ``-done`` not.
    """
    found = {}
    kinds = "|".join(COLLECTIVES)
    for match in re.finditer(rf"= (.*?) ({kinds})(?:-start)?\(", hlo_text):
        shapes, kind = match.groups()
        size = 0
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shapes):
            if dtype in _BYTES:
                size += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
        entry = found.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += size
    return found


def _layer(config, pattern):
    import keras

    import keras_attn
    from keras_attn import patterns

    if config in ("keras", "keras_one"):
        window = {"sliding_window": WINDOW} if pattern == "local" else {}
        return keras.layers.MultiHeadAttention(HEADS, KEY_DIM, **window)
    chosen = patterns.Causal() if pattern == "causal" else patterns.Local(WINDOW, causal=True)
    context = None
    if config in ("ring", "all_gather", "halo"):
        context = keras_attn.ContextParallel(axis="seq", strategy=config)
    return keras_attn.Attention(
        num_heads=HEADS, key_dim=KEY_DIM, pattern=chosen, context_parallel=context
    )


def _step(layer, causal_flag):
    """``step(trainable, x) -> (loss, gradients)``: a forward and backward pass."""
    import jax

    def loss(trainable, x):
        kwargs = {"use_causal_mask": True} if causal_flag else {}
        output, _ = layer.stateless_call(trainable, [], x, x, **kwargs)
        return (output.astype("float32") ** 2).mean()

    return jax.value_and_grad(loss, argnums=(0, 1))


def measure(config, pattern, length, mesh, run_steps=0):
    """Compile one configuration's training step; returns its per-device figures."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec

    layer = _layer(config, pattern)
    layer.build((1, length, WIDTH), (1, length, WIDTH))
    trainable = [v.value for v in layer.trainable_variables]
    one = config in ("one_device", "keras_one")
    # Keras's layer takes the causal mask as a call argument (keras_attn's pattern has it).
    step = jax.jit(_step(layer, causal_flag=config in ("keras", "keras_one")))
    x = jax.ShapeDtypeStruct((1, length, WIDTH), "float32")
    device = jax.devices()[0]
    if one:
        x_sharding = jax.sharding.SingleDeviceSharding(device)
        w_sharding = x_sharding
    else:
        x_sharding = NamedSharding(mesh, PartitionSpec(None, "seq", None))
        w_sharding = NamedSharding(mesh, PartitionSpec())
    x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x_sharding)
    weights = [jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=w_sharding) for w in trainable]
    start = time.perf_counter()
    compiled = step.lower(weights, x).compile()
    result = {
        "config": config,
        "pattern": pattern,
        "length": length,
        "devices": 1 if one else mesh.size,
        "compile_s": round(time.perf_counter() - start, 2),
        "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
        "collectives": {} if one else collectives(compiled.as_text()),
        "path": getattr(layer, "last_path", None),
    }
    if run_steps:
        from benchmarks.timing import time_passes

        values = [jax.device_put(np.asarray(w), w_sharding) for w in trainable]
        data = np.random.default_rng(0).normal(size=x.shape).astype("float32")
        inputs = jax.device_put(data, x_sharding)
        passes = time_passes(lambda: jax.block_until_ready(compiled(values, inputs)), run_steps)
        result["time_s"] = passes.median
        result["tokens_per_s"] = length / passes.median
    return result


def gib(value):
    return value / 2**30


def longest_within(results, config, pattern, budget):
    """The longest T measured whose temp memory fits `budget` bytes (None: none fits)."""
    fits = [
        r["length"]
        for r in results
        if r["config"] == config and r["pattern"] == pattern and r.get("temp_bytes") is not None
        and r["temp_bytes"] <= budget
    ]  # fmt: skip
    return max(fits, default=None)


def _collective_cell(entry):
    if entry.get("error"):
        return "—"
    parts = [
        f"{c['count']}× {kind} ({gib(c['bytes']) * 1024:.0f} MiB)"
        for kind, c in sorted(entry["collectives"].items())
    ]
    return ", ".join(parts) or "none"


def markdown(results, budget, lengths):
    """The tables: temp memory per device (GiB), collectives, longest T within budget."""
    lines = []
    for pattern in PATTERNS:
        title = "causal" if pattern == "causal" else f"causal local({WINDOW})"
        lines += [
            f"**{title}**: temporary memory per device (GiB) of a training step",
            "",
            "| | " + " | ".join(f"T={t}" for t in lengths) + " |",
            "|---" * (len(lengths) + 1) + "|",
        ]
        for config in CONFIGS[pattern]:
            row = []
            for t in lengths:
                entry = _find(results, config, pattern, t)
                if entry is None:
                    row.append("")
                elif entry.get("error"):
                    row.append(entry["error"])
                else:
                    row.append(f"{gib(entry['temp_bytes']):.3f}")
            lines.append(f"| {config} | " + " | ".join(row) + " |")
        lines += ["", f"Collectives per device at T={lengths[-1]} (count, result bytes):", ""]
        for config in CONFIGS[pattern]:
            entry = _find(results, config, pattern, lengths[-1])
            if entry is not None and not config.endswith("one") and config != "one_device":
                lines.append(f"- {config}: {_collective_cell(entry)}")
        lines += [""]
    lines += [
        f"Longest T measured whose temporary memory fits {gib(budget):.2f} GiB per device:",
        "",
        "| pattern | keras_attn, 1 device | ring, 8 | halo, 8 | all_gather, 8 | "
        "gspmd, 8 | keras, 1 | keras, 8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pattern in PATTERNS:
        cells = [
            longest_within(results, c, pattern, budget)
            for c in ("one_device", "ring", "halo", "all_gather", "gspmd", "keras_one", "keras")
        ]
        # "—": not measured for this pattern; "<T": not even the shortest T fits.
        columns = ("one_device", "ring", "halo", "all_gather", "gspmd", "keras_one", "keras")
        text = [
            "—" if config not in CONFIGS[pattern] else str(cell or f"<{lengths[0]}")
            for config, cell in zip(columns, cells, strict=True)
        ]
        lines.append(f"| {pattern} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def _find(results, config, pattern, length):
    for r in results:
        if (r["config"], r["pattern"], r["length"]) == (config, pattern, length):
            return r
    return None


def _merged(path, results):
    """The results of the report at `path`, those measured again replaced by `results`."""
    if not os.path.exists(path):
        return results
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)["results"]
    new = {(r["config"], r["pattern"], r["length"]): r for r in results}
    merged = [new.pop((r["config"], r["pattern"], r["length"]), r) for r in previous]
    return merged + list(new.values())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__)
    parser.add_argument("--max-length", type=int, default=LENGTHS[-1])
    parser.add_argument("--min-length", type=int, default=LENGTHS[0])
    parser.add_argument("--budget-gib", type=float, default=4.0, help="per-device memory budget")
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument(
        "--configs",
        default=None,
        help="comma-separated (default: all); the other configurations' results already "
        "in --output are kept, so one column can be measured again",
    )
    parser.add_argument(
        "--cap",
        action="append",
        default=[],
        metavar="CONFIG:PATTERN=T",
        help="compile CONFIG on PATTERN only up to T (compile time: GSPMD's causal "
        "block-sparse program grows about 3.4x per doubling of T on a CPU)",
    )
    parser.add_argument("--time", type=int, default=0, metavar="N", help="also run N steps")
    parser.add_argument("--output", default=os.path.join("benchmarks", "results-distributed.json"))
    args = parser.parse_args(argv)

    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax
    import keras

    if keras.backend.backend() != "jax":
        parser.error(
            f"context parallelism needs the JAX backend. Received: {keras.backend.backend()}"
        )
    devices = jax.devices()
    if len(devices) < 2:
        parser.error(
            "one device: set XLA_FLAGS=--xla_force_host_platform_device_count=8 before "
            f"starting Python (or run on several accelerators). Received: {len(devices)} device"
        )
    mesh = keras.distribution.DeviceMesh((1, len(devices)), ("batch", "seq"), devices)
    distribution = keras.distribution.ModelParallel(
        layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"
    )
    lengths = [t for t in LENGTHS if args.min_length <= t <= args.max_length]
    lengths = lengths or [args.max_length]
    patterns = args.patterns.split(",")
    configs = args.configs.split(",") if args.configs else None
    caps = {}
    for cap in args.cap:
        pair, _, length = cap.partition("=")
        caps[tuple(pair.split(":"))] = int(length)
    results = []
    with distribution.scope():
        for pattern in patterns:
            for config in CONFIGS[pattern]:
                if configs and config not in configs:
                    continue
                for length in lengths:
                    if length > caps.get((config, pattern), length):
                        results.append({"config": config, "pattern": pattern, "length": length,
                                        "error": "not compiled"})  # fmt: skip
                        continue
                    try:
                        entry = measure(config, pattern, length, mesh.backend_mesh, args.time)
                    except NotImplementedError as e:
                        entry = {"config": config, "pattern": pattern, "length": length,
                                 "error": "not implemented", "detail": str(e)[:300]}  # fmt: skip
                    except Exception as e:  # a size that does not compile: say so, go on
                        entry = {"config": config, "pattern": pattern, "length": length,
                                 "error": type(e).__name__, "detail": str(e)[:300]}  # fmt: skip
                    results.append(entry)
                    print(json.dumps(entry), file=sys.stderr, flush=True)
    if configs:
        results = _merged(args.output, results)
    report = {
        "devices": [str(d) for d in devices],
        "budget_bytes": int(args.budget_gib * 2**30),
        "results": results,
    }
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(markdown(results, report["budget_bytes"], lengths))
    return report


if __name__ == "__main__":
    main()
