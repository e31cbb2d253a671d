"""How fast this machine runs the block-sparse kernel's matmuls, against a square one.

Run ``python -m benchmarks.matmul_shapes`` (``--length``, ``--block-size``,
``--window``). The block-sparse kernel of LocalAttention(window) makes six batched
matmuls per forward+backward pass on slabs of ``(B·H·rows, bs, W·bs)`` scores: two
write a slab (``q·kᵀ`` forward, ``dO·vᵀ`` backward) and four read one. This times each
alone, compiled, waiting for the result without copying it (`benchmarks.timing`), next
to a square float32 matmul timed the same way. Their sum bounds the kernel from below:
a kernel made of these matmuls cannot reach a higher useful-FLOP rate than
``useful FLOPs / sum`` even if everything else were free.
"""

import argparse
import os

from benchmarks import timing
from benchmarks.workload import HEADS
from benchmarks.workload import KEY_DIM
from benchmarks.workload import allowed_pairs


def _time(fn, *args, repeats=7):
    """Fastest of `repeats` compiled passes of ``fn(*args)`` (after a warm-up one)."""
    return timing.time_passes(timing.compiled_step(fn, *args), repeats).min


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--square", type=int, default=2048)
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "tensorflow"))
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    import keras

    from keras_attn import block_layout
    from keras_attn import patterns

    bs = args.block_size
    (group,) = block_layout.block_layout(
        patterns.Local(args.window), args.length, args.length, bs
    ).groups
    rows, width = group.cols.shape
    n = HEADS * rows  # batch 1
    r = keras.random
    q, d_out = r.normal((n, bs, KEY_DIM), seed=0), r.normal((n, bs, KEY_DIM), seed=1)
    k = r.normal((n, width * bs, KEY_DIM), seed=2)
    s = r.normal((n, bs, width * bs), seed=3)
    ein = keras.ops.einsum
    flops = 2 * n * bs * width * bs * KEY_DIM
    cases = [
        ("scores q·kᵀ (writes a slab)", lambda q, k: ein("nqd,nkd->nqk", q, k), (q, k)),
        ("output w·v", lambda s, k: ein("nqk,nkd->nqd", s, k), (s, k)),
        ("d_weights dO·vᵀ (writes a slab)", lambda d, k: ein("nqd,nkd->nqk", d, k), (d_out, k)),
        ("d_value wᵀ·dO", lambda s, d: ein("nqk,nqd->nkd", s, d), (s, d_out)),
        ("d_query dS·k", lambda s, k: ein("nqk,nkd->nqd", s, k), (s, k)),
        ("d_key dSᵀ·q", lambda s, q: ein("nqk,nqd->nkd", s, q), (s, q)),
    ]
    print(
        f"Backend {keras.backend.backend()}; T={args.length}, block {bs}, window "
        f"{args.window}: {n} slabs of {bs}x{width * bs} scores, key_dim {KEY_DIM}.\n"
    )
    print("| matmul | ms | GFLOP/s |\n| --- | --- | --- |")
    total = 0.0
    for name, fn, inputs in cases:
        t = _time(fn, *inputs)
        total += t
        print(f"| {name} | {t * 1e3:.1f} | {flops / t / 1e9:.1f} |")
    m = args.square
    a, b = r.normal((m, m), seed=4), r.normal((m, m), seed=5)
    t_square = _time(keras.ops.matmul, a, b)
    square = 2 * m**3 / t_square / 1e9
    print(f"| square {m}x{m} | {t_square * 1e3:.1f} | {square:.1f} |")
    pairs = allowed_pairs("local", args.length, args.window)
    useful = 3 * pairs * HEADS * 4 * KEY_DIM
    bound = useful / total / 1e9
    print(
        f"\nThe six take {total * 1e3:.0f} ms together ({6 * flops / 1e9:.1f} GFLOP computed, "
        f"{useful / 1e9:.1f} GFLOP useful). Bound on the kernel's useful rate: "
        f"{bound:.1f} GFLOP/s = {100 * bound / square:.0f}% of the square matmul."
    )


if __name__ == "__main__":
    main()
