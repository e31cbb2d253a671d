"""PyTorch on a CPU, inference: compiled FlexAttention beside keras_attn's block-sparse
path and Keras's ``sliding_window`` (issue 20).

    python -m benchmarks.flex_cpu                     # T = 8192, causal window 256
    python -m benchmarks.flex_cpu --length 1024 --repeats 1   # a quick check

Forward passes only, under ``torch.no_grad()`` (compiled FlexAttention has no
backward pass on a CPU), float32, batch 1, 8 heads of 64, a causal sliding window.
Two tables, each as seconds and ratios to its first row (median of ``--repeats``
passes after one warm-up pass that compiles):

- kernels alone, on projected heads: compiled FlexAttention with keras_attn's
  BlockMask (`keras_attn.native.flex_attention`, what the native plan runs) against
  keras_attn's block-sparse kernel (`keras_attn.dispatch.attend` on a block-sparse plan);
- whole layers: ``keras_attn.LocalAttention(window, causal=True)``, which under
  ``torch.no_grad()`` plans the native path (compiled FlexAttention), the same layer
  kept off it (``flash_attention=False``: the block-sparse path), and
  ``keras.layers.MultiHeadAttention(sliding_window=window)`` with its causal mask
  (the whole T x T score matrix; skipped above ``--keras-max-length``).

Prints a markdown report; ``--json PATH`` also writes the numbers.
"""

import argparse
import json
import os
import platform
import sys

os.environ["KERAS_BACKEND"] = "torch"

from benchmarks import timing  # noqa: E402

HEADS, KEY_DIM, WINDOW = 8, 64, 256


def _no_grad_step(fn, *args):
    import torch

    def step():
        with torch.no_grad():
            return float(fn(*args).sum())

    return step


def _kernel_steps(length, window):
    import keras

    from keras_attn import devices
    from keras_attn import dispatch
    from keras_attn import native
    from keras_attn import normalizers
    from keras_attn import patterns
    from keras_attn import scores
    from keras_attn.components import Components

    pattern = patterns.Local(window, causal=True)
    components = Components(scores.ScaledDot(), (), pattern, normalizers.Softmax())
    q, k, v = (
        keras.random.normal((1, length, HEADS, KEY_DIM), seed=i, dtype="float32") for i in range(3)
    )
    scale = KEY_DIM**-0.5
    sparse = dispatch.plan(
        components,
        query_length=length,
        key_length=length,
        head_dim=KEY_DIM,
        block_sparse=True,
        machine=devices.Machine("torch", "cpu"),
    )
    assert sparse.path == "block_sparse", sparse.path
    return {
        "compiled FlexAttention": _no_grad_step(
            lambda q, k, v: native.flex_attention(q, k, v, pattern, scale=scale), q, k, v
        ),
        "keras_attn block-sparse": _no_grad_step(
            lambda q, k, v: dispatch.attend(sparse, q, k, v)[0], q, k, v
        ),
    }


def _layer_steps(length, window, keras_max_length):
    import keras

    import keras_attn

    x = keras.random.normal((1, length, HEADS * KEY_DIM), seed=0, dtype="float32")
    make = dict(window=window, causal=True, num_heads=HEADS, key_dim=KEY_DIM)
    native = keras_attn.LocalAttention(**make)
    sparse = keras_attn.LocalAttention(flash_attention=False, **make)
    steps = {}

    def checked(layer, path):
        def call(x):
            out = layer(x, x)
            if layer.last_path != path:
                raise RuntimeError(f"{layer.name} ran {layer.last_path!r}, expected {path!r}")
            return out

        return call

    steps["keras_attn LocalAttention (native: FlexAttention)"] = _no_grad_step(
        checked(native, "native"), x
    )
    steps["keras_attn LocalAttention (block-sparse)"] = _no_grad_step(
        checked(sparse, "block_sparse"), x
    )
    if length <= keras_max_length:
        mha = keras.layers.MultiHeadAttention(HEADS, KEY_DIM, sliding_window=window)
        steps["keras MultiHeadAttention(sliding_window)"] = _no_grad_step(
            lambda x: mha(x, x, use_causal_mask=True), x
        )
    return steps


def _table(title, results):
    first = next(iter(results.values()))
    lines = [
        f"### {title}",
        "",
        "| | seconds | ratio | warm-up s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, passes in results.items():
        lines.append(
            f"| {name} | {passes.median:.4f} | {passes.median / first.median:.2f}x "
            f"| {passes.warmup_s:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--window", type=int, default=WINDOW)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keras-max-length", type=int, default=8192)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    import torch

    runs = {
        "kernels": _kernel_steps(args.length, args.window),
        "layers": _layer_steps(args.length, args.window, args.keras_max_length),
    }
    measured = {
        table: {name: timing.time_passes(step, args.repeats) for name, step in steps.items()}
        for table, steps in runs.items()
    }
    print(
        f"PyTorch {torch.__version__} on {platform.processor() or platform.machine()} "
        f"({torch.get_num_threads()} threads). T={args.length}, causal window {args.window}, "
        f"B=1, H={HEADS}, D={KEY_DIM}, float32, forward only under torch.no_grad().\n"
    )
    print(_table("Kernels (projected heads)", measured["kernels"]) + "\n")
    print(_table("Layers (with projections)", measured["layers"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "length": args.length,
                    "window": args.window,
                    "results": {
                        table: {name: {"median_s": p.median, "warmup_s": p.warmup_s,
                                       "times": list(p.times)} for name, p in rows.items()}
                        for table, rows in measured.items()
                    },
                },
                f,
                indent=2,
            )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
