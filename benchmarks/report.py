"""The results page of `benchmarks.run`: a markdown table with ratios and targets, and a plot."""

import os

from benchmarks.workload import HEADS
from benchmarks.workload import KEY_DIM
from benchmarks.workload import WINDOW
from benchmarks.workload import useful_flops


def _index(results):
    return {(r["impl"], r["case"], r["length"]): r for r in results}


def _ok(r):
    return r is not None and "time_s" in r


def _time(r):
    if r is None:
        return "—"
    if "skipped" in r:
        return f"skipped ({r['skipped']})"
    if "error" in r:
        return f"failed ({r['error'][:60]})"
    return f"{r['time_s']:.3f}"


def _mem(r):
    return f"{r['peak_rss'] / 2**30:.2f}" if _ok(r) else "—"


def _ratio(a, b, key):
    return f"{a[key] / b[key]:.2f}" if _ok(a) and _ok(b) else "—"


def _gflops(r, case, projections=True):
    if not _ok(r):
        return "—"
    return f"{useful_flops(case, r['length'], projections) / r['time_s'] / 1e9:.1f}"


def _computed_gflops(r):
    """Kernel GFLOP/s counting every pair computed, block padding included."""
    if not _ok(r) or "computed_pairs" not in r:
        return "—"
    return f"{r['computed_pairs'] * HEADS * 4 * KEY_DIM * 3 / r['time_s'] / 1e9:.1f}"


def _lengths(results, case):
    return sorted({r["length"] for r in results if r["case"] == case})


def _tables(results, meta):
    idx = _index(results)
    matmul = next((r for r in results if r["case"] == "matmul" and _ok(r)), None)
    peak = None
    if matmul:
        n = matmul["length"]
        peak = 2 * n**3 / matmul["time_s"] / 1e9
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {meta['machine']}. Backend: {meta['backend']} {meta['backend_version']}, "
        f"Keras {meta['keras']}. Run {meta['date']} in {meta['duration_s'] / 60:.0f} min"
        f"{' (--quick)' if meta.get('quick') else ''}.",
        "",
        f"Forward+backward pass (gradients for the input and every weight), batch 1, "
        f"{HEADS} heads, key_dim {KEY_DIM}; median time in seconds; peak resident memory "
        "(GiB) of the process that ran it, Python, TensorFlow/JAX and the inputs "
        "included. `ratio` is keras_attn / Keras (below 1 is better for keras_attn). "
        "`load` is the 1-minute load average before the measurement (the machine is shared).",
        "",
    ]
    rounds = max((len(r.get("round_times_s", [])) for r in results), default=0)
    if rounds > 1:
        lines += [
            f"Dense sizes ran {rounds} times each, alternating the two layers in separate "
            "processes; the table gives the median over those rounds (all rounds in "
            "`results.json`).",
            "",
        ]
    if peak:
        lines += [
            f"Dense float32 matmul ({matmul['length']}x{matmul['length']}): "
            f"**{peak:.1f} GFLOP/s**.",
            "",
        ]
    lines += [
        "## Dense, causal: keras_attn.MultiHeadAttention vs keras.layers.MultiHeadAttention",
        "",
        "| T | keras_attn s | Keras s | time ratio | keras_attn GiB | Keras GiB | memory ratio "
        "| path | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in _lengths(results, "dense"):
        a, b = idx.get(("keras_attn", "dense", t)), idx.get(("keras", "dense", t))
        lines.append(
            f"| {t} | {_time(a)} | {_time(b)} | {_ratio(a, b, 'time_s')} | {_mem(a)} | {_mem(b)} "
            f"| {_ratio(a, b, 'peak_rss')} | {(a or {}).get('path', '—')} "
            f"| {(a or {}).get('load_before', 0):.1f} |"
        )
    lines += [
        "",
        f"## Local, window {WINDOW}: keras_attn.LocalAttention vs "
        f"keras.layers.MultiHeadAttention(sliding_window={WINDOW})",
        "",
        "`speed-up` is Keras time / keras_attn time. GFLOP/s counts only the useful work: "
        "the allowed pairs and the four projections (layer), or the allowed pairs alone "
        "(kernel: the block-sparse kernel without projections). `kernel computed` counts "
        "every pair the kernel computes, the padding of partial blocks included.",
        "",
        "| T | keras_attn s | Keras s | speed-up | keras_attn GiB | Keras GiB | memory ratio "
        "| layer GFLOP/s | kernel s | kernel GFLOP/s | kernel computed GFLOP/s | path | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in _lengths(results, "local"):
        a, b = idx.get(("keras_attn", "local", t)), idx.get(("keras", "local", t))
        c = idx.get(("keras_attn", "core", t))
        lines.append(
            f"| {t} | {_time(a)} | {_time(b)} | {_ratio(b, a, 'time_s')} | {_mem(a)} | "
            f"{_mem(b)} | {_ratio(a, b, 'peak_rss')} | {_gflops(a, 'local')} | {_time(c)} | "
            f"{_gflops(c, 'local', projections=False)} | {_computed_gflops(c)} "
            f"| {(a or {}).get('path', '—')} "
            f"| {(a or {}).get('load_before', 0):.1f} |"
        )
    lg = _lengths(results, "local_global")
    if lg:
        lines += [
            "",
            f"## keras_attn with local({WINDOW}) | global_tokens(1)",
            "",
            "| T | time s | GiB | layer GFLOP/s | path | load |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for t in lg:
            a = idx.get(("keras_attn", "local_global", t))
            lines.append(
                f"| {t} | {_time(a)} | {_mem(a)} | {_gflops(a, 'local_global')} | "
                f"{(a or {}).get('path', '—')} | {(a or {}).get('load_before', 0):.1f} |"
            )
    lines += ["", "## Targets", ""] + _targets(idx, results, peak)
    return "\n".join(lines) + "\n"


def _targets(idx, results, peak):
    out = []
    dense = [
        (t, idx.get(("keras_attn", "dense", t)), idx.get(("keras", "dense", t)))
        for t in _lengths(results, "dense")
    ]
    ratios = [(t, a["time_s"] / b["time_s"]) for t, a, b in dense if _ok(a) and _ok(b)]
    if ratios:
        worst = max(ratios, key=lambda x: x[1])
        verdict = "met" if worst[1] <= 1.0 else "missed"
        out.append(
            f"- Dense time ratio <= 1.0 at every T: **{verdict}** (worst {worst[1]:.2f} at "
            f"T={worst[0]}; all: {', '.join(f'{t}: {r:.2f}' for t, r in ratios)})."
        )
    a, b = idx.get(("keras_attn", "local", 8192)), idx.get(("keras", "local", 8192))
    if _ok(a) and _ok(b):
        speed, mem = b["time_s"] / a["time_s"], a["peak_rss"] / b["peak_rss"]
        out.append(
            f"- Local T=8192 at least 6x faster: **{'met' if speed >= 6 else 'missed'}** "
            f"({speed:.1f}x); at most 1/5 the peak memory: "
            f"**{'met' if mem <= 0.2 else 'missed'}** ({mem:.2f})."
        )
    a, b = idx.get(("keras_attn", "local", 8192)), idx.get(("keras_attn", "local", 65536))
    if _ok(a) and _ok(b):
        growth = b["time_s"] / a["time_s"]
        out.append(
            f"- time(65536) / time(8192) <= 9: **{'met' if growth <= 9 else 'missed'}** "
            f"({growth:.1f}; 8x the length)."
        )
    if peak:
        rates = [
            (r["length"], useful_flops("local", r["length"], False) / r["time_s"] / 1e9)
            for r in results
            if r["case"] == "core" and _ok(r)
        ]
        if rates:
            best = max(rates, key=lambda x: x[1])
            out.append(
                f"- Block-sparse useful-FLOP rate >= 40% of matmul ({peak:.1f} GFLOP/s): "
                f"**{'met' if best[1] >= 0.4 * peak else 'missed'}** (kernel best "
                f"{best[1]:.1f} GFLOP/s = {100 * best[1] / peak:.0f}% at T={best[0]}; "
                + ", ".join(f"{t}: {100 * g / peak:.0f}%" for t, g in rates)
                + ")."
            )
    return out


def _plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [
        ("keras_attn", "dense", "keras_attn MHA, causal", "C0", "-"),
        ("keras", "dense", "Keras MHA, causal", "C1", "-"),
        ("keras_attn", "local", f"keras_attn LocalAttention({WINDOW})", "C0", "--"),
        ("keras", "local", f"Keras MHA sliding_window={WINDOW}", "C1", "--"),
        ("keras_attn", "local_global", "keras_attn local | global_tokens", "C2", ":"),
    ]
    for impl, case, label, color, style in series:
        rows = sorted(
            (r for r in results if r["impl"] == impl and r["case"] == case and _ok(r)),
            key=lambda r: r["length"],
        )
        if not rows:
            continue
        ts = [r["length"] for r in rows]
        axes[0].plot(ts, [r["time_s"] for r in rows], style, color=color, marker="o", label=label)
        axes[1].plot(
            ts, [r["peak_rss"] / 2**30 for r in rows], style, color=color, marker="o", label=label
        )
    for ax, ylabel in zip(axes, ("forward+backward time (s)", "peak memory (GiB)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"batch 1, {HEADS} heads, key_dim {KEY_DIM}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(results, meta, out):
    """Write ``results.md`` and ``results.png`` into the folder `out`."""
    text = _tables(results, meta)
    if _plot(results, os.path.join(out, "results.png")):
        text += "\n![time and memory against T](results.png)\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
