"""keras_attn's attention kernel beside each backend's own kernels, on a GPU or TPU.

Run on a machine with a GPU (JAX with CUDA, PyTorch with CUDA, Keras 3):

    python -m benchmarks.accelerators                    # both backends, all cases
    python -m benchmarks.accelerators --backends jax --lengths 8192,32768
    python -m benchmarks.accelerators --quick --allow-cpu   # a dry run on a CPU

Every case times forward+backward of the attention kernel alone (no projections) on
``(B=1, T, H=16, D=64)`` bfloat16 heads, median of ``--repeats`` passes after one
warm-up pass, each case in its own subprocess. Side by side in one run:

- ``keras_attn``: `keras_attn.dispatch.plan` + `attend` with scaled_dot + softmax and
  the case's pattern, on the path the engine chooses (reported);
- the backend's best kernel for the same pattern: on JAX, cuDNN through
  ``jax.nn.dot_product_attention(implementation="cudnn", local_window_size=...)``
  (sliding windows only), or on a TPU Splash attention with the mask keras_attn makes
  from the pattern (`keras_attn.native.splash_mask`); on PyTorch, FlexAttention with a block mask from
  ``create_block_mask`` (which builds a dense mask: out of memory at long lengths);
- full causal flash attention (cuDNN / PyTorch SDPA), what a dense layer would cost;
- ``pallas`` (JAX only): the block-sparse plan (blocks of 128) on keras_attn's opt-in
  Pallas kernel (`keras_attn.pallas`, ``KERAS_ATTN_PALLAS=1``; interpret mode in a
  ``--allow-cpu`` dry run), not yet measured on a GPU before this benchmark.

Cases: causal ``local`` (window 256), ``local | global_tokens(1)``, ``dilated``
(window 128, dilation 2, causal) and ``bigbird`` (the BigBird plugin, blocks of 64).
Writes ``--out/results-accelerators.md`` and ``.json``: times, ratios to the
backend's kernel, and the useful-FLOP rate (allowed pairs only).
"""

import argparse
import json
import os
import platform
import subprocess
import sys

import numpy as np

from benchmarks import timing

B, H, D = 1, 16, 64
WINDOW = 256
CASES = ("local", "local_global", "dilated", "bigbird")
LENGTHS = (8192, 32768, 131072)


# -- the patterns, for keras_attn and as element masks --------------------------------


def _pattern(case):
    from keras_attn import patterns

    if case == "local":
        return patterns.Local(WINDOW, causal=True)
    if case == "local_global":
        return patterns.Local(WINDOW, causal=True) | patterns.GlobalTokens(1)
    if case == "dilated":
        return patterns.Dilated(WINDOW // 2, dilation=2, causal=True)
    from keras_attn_bigbird import BigBird

    return BigBird(block_size=64)


def allowed_pairs(case, length):
    """Pairs the case's pattern allows, per head (counted block by block, in numpy)."""
    from keras_attn.positions import Positions

    pattern, total, step = _pattern(case), 0, 1024
    key = np.arange(length).reshape(1, 1, 1, -1)
    for start in range(0, length, step):
        query = np.arange(start, min(start + step, length)).reshape(1, 1, -1, 1)
        mask = np.asarray(pattern.mask(Positions(query, key, np.zeros((1, 1, 1, 1), int))))
        total += int(np.broadcast_to(mask, (1, 1, query.shape[2], length)).sum())
    return total


# -- one measurement (child process) -------------------------------------------------


def _keras_attn_step(case, length, allow_cpu):
    import keras

    from keras_attn import dispatch
    from keras_attn import normalizers
    from keras_attn import scores
    from keras_attn.components import Components

    components = Components(scores.ScaledDot(), (), _pattern(case), normalizers.Softmax())
    plan = dispatch.plan(components, query_length=length, key_length=length, head_dim=D)

    def attend(q, k, v):
        return dispatch.attend(plan, q, k, v)[0]

    q, k, v = (keras.random.normal((B, length, H, D), seed=i, dtype="bfloat16") for i in range(3))
    return _grad_step(attend, q, k, v), plan.path


def _pallas_step(case, length, allow_cpu):
    """keras_attn's block-sparse plan on its Pallas kernel (JAX), or None where it cannot run."""
    import keras

    if keras.backend.backend() != "jax":
        return None
    import jax

    from keras_attn import dispatch
    from keras_attn import normalizers
    from keras_attn import pallas
    from keras_attn import scores
    from keras_attn.components import Components

    on_cpu = jax.default_backend() == "cpu"
    os.environ[pallas.ENV_VAR] = "interpret" if allow_cpu and on_cpu else "1"
    components = Components(scores.ScaledDot(), (), _pattern(case), normalizers.Softmax())
    plan = dispatch.plan(
        components, query_length=length, key_length=length, head_dim=D, block_sparse=True
    )
    if plan.kernel != pallas.KERNEL:  # the plan decides the kernel
        return None

    def attend(q, k, v):
        return dispatch.attend(plan, q, k, v)[0]

    q, k, v = (keras.random.normal((B, length, H, D), seed=i, dtype="bfloat16") for i in range(3))
    return _grad_step(attend, q, k, v)


def _grad_step(fn, q, k, v):
    """Forward+backward of the attention ``fn(q, k, v)``: gradients of its float32 sum."""
    import keras

    def loss(q, k, v):
        return keras.ops.sum(keras.ops.cast(fn(q, k, v), "float32"))

    return timing.gradient_step(loss, q, k, v)


def _reference_step(kind, case, length, allow_cpu):
    """The backend's own kernel: ``kind`` is "best" (for this pattern) or "flash" (full causal)."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        if jax.default_backend() == "tpu":
            if kind == "best":
                return _splash_step(case, length)
            implementation = None  # XLA's attention: cuDNN is for NVIDIA GPUs
        else:
            implementation = None if allow_cpu and jax.default_backend() == "cpu" else "cudnn"
        if kind == "best" and case != "local":
            return None  # cuDNN has sliding windows only
        window = (WINDOW - 1, 0) if kind == "best" else None

        def attend(q, k, v):
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=True, local_window_size=window, implementation=implementation
            )

        q, k, v = (
            jax.random.normal(jax.random.key(i), (B, length, H, D), "bfloat16") for i in range(3)
        )
        return _grad_step(attend, q, k, v)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.randn(B, H, length, D, dtype=torch.bfloat16, device=device) for _ in range(3))
    if kind == "flash":
        return _grad_step(
            lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
            q, k, v,
        )  # fmt: skip
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention

    pattern = _pattern(case)

    def mask_mod(b, h, q_idx, kv_idx):
        # The pattern's own element mask on index tensors (patterns use keras.ops,
        # which take torch tensors on this backend).
        from keras_attn.positions import Positions

        return pattern.mask(Positions(q_idx, kv_idx, h))

    block_mask = create_block_mask(mask_mod, None, None, length, length, device=device)
    flex = torch.compile(flex_attention) if device == "cuda" else flex_attention
    return _grad_step(lambda q, k, v: flex(q, k, v, block_mask=block_mask), q, k, v)


def _splash_step(case, length):
    """Splash attention (Pallas, TPU) with the mask keras_attn makes from the pattern."""
    import jax

    from keras_attn import native

    pattern = _pattern(case)
    q, k, v = (
        jax.random.normal(jax.random.key(i), (B, length, H, D), "bfloat16") for i in range(3)
    )
    return _grad_step(
        lambda q, k, v: native.splash_attention(q, k, v, pattern, scale=D**-0.5), q, k, v
    )


def _child(spec):
    os.environ["KERAS_BACKEND"] = spec["backend"]
    result = dict(spec)
    try:
        if spec["kind"] == "keras_attn":
            step, result["path"] = _keras_attn_step(spec["case"], spec["length"], spec["allow_cpu"])
        elif spec["kind"] == "pallas":
            step = _pallas_step(spec["case"], spec["length"], spec["allow_cpu"])
            if step is None:
                return {**result, "skipped": "no Pallas kernel here (JAX only)"}
        else:
            step = _reference_step(spec["kind"], spec["case"], spec["length"], spec["allow_cpu"])
            if step is None:
                return {**result, "skipped": "no kernel for this pattern"}
        result["time_s"] = timing.time_passes(step, spec["repeats"]).median
    except Exception as e:  # out of memory is a result here, not a failure of the run
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return result


# -- the run (parent process) --------------------------------------------------------


def _measure(spec):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.accelerators", "--child", json.dumps(spec)],
        capture_output=True, text=True, timeout=spec["timeout"],
    )  # fmt: skip
    for line in done.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {**spec, "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def _machine():
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        gpu = ""
    return gpu or f"no GPU ({platform.processor() or platform.machine()})"


def report(results, meta):
    """Markdown: one table per backend, time in ms and ratios to the backend's kernels."""
    lines = [
        "# keras_attn's kernel beside the backend's own, on an accelerator",
        "",
        f"Machine: {meta['machine']}. B={B}, H={H}, D={D}, bfloat16, forward+backward, "
        f"median ms of {meta['repeats']} passes. Useful TFLOP/s count allowed pairs only.",
        "",
    ]
    by = {(r["backend"], r["kind"], r["case"], r["length"]): r for r in results}
    for backend in meta["backends"]:
        lines += [
            f"## {backend}",
            "",
            "| case | T | keras_attn ms (path) | best kernel ms | ratio | full causal flash ms "
            "| keras_attn useful TFLOP/s | pallas ms | pallas / best |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for case in meta["cases"]:
            for length in meta["lengths"]:
                ours = by.get((backend, "keras_attn", case, length), {})
                best = by.get((backend, "best", case, length), {})
                flash = by.get((backend, "flash", case, length), {})
                ours_pallas = by.get((backend, "pallas", case, length), {})

                def ms(r):
                    if "time_s" in r:
                        return f"{1e3 * r['time_s']:.2f}"
                    return r.get("skipped") or r.get("error", "—")

                ratio = _ratio(ours, best)
                rate = "—"
                if "time_s" in ours:
                    flops = 3 * allowed_pairs(case, length) * H * 4 * D
                    rate = f"{flops / ours['time_s'] / 1e12:.1f}"
                lines.append(
                    f"| {case} | {length} | {ms(ours)} ({ours.get('path', '?')}) | {ms(best)} "
                    f"| {ratio} | {ms(flash)} | {rate} | {ms(ours_pallas)} "
                    f"| {_ratio(ours_pallas, best)} |"
                )
        lines.append("")
    return "\n".join(lines)


def _ratio(ours, best):
    if "time_s" in ours and "time_s" in best:
        return f"{ours['time_s'] / best['time_s']:.2f}"
    return "—"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="jax,torch")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per measurement")
    parser.add_argument("--quick", action="store_true", help="T=1024, 2 passes: a dry run")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (dry run)")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_child(json.loads(args.child))))
        return 0
    lengths = (1024,) if args.quick else tuple(int(t) for t in args.lengths.split(","))
    repeats = 2 if args.quick else args.repeats
    meta = {
        "machine": _machine(),
        "backends": args.backends.split(","),
        "cases": args.cases.split(","),
        "lengths": lengths,
        "repeats": repeats,
    }
    if meta["machine"].startswith("no GPU") and not args.allow_cpu:
        parser.error("no GPU found (nvidia-smi); pass --allow-cpu for a dry run on the CPU")
    results = []
    for backend in meta["backends"]:
        for case in meta["cases"]:
            for length in lengths:
                for kind in ("keras_attn", "best", "flash", "pallas"):
                    spec = dict(
                        backend=backend, kind=kind, case=case, length=length, repeats=repeats,
                        allow_cpu=args.allow_cpu, timeout=args.timeout,
                    )  # fmt: skip
                    result = _measure(spec)
                    print(json.dumps(result), flush=True)
                    results.append(result)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results-accelerators.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(os.path.join(args.out, "results-accelerators.md"), "w") as f:
        f.write(report(results, meta) + "\n")
    print(f"wrote {args.out}/results-accelerators.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
