"""Packed sequences on the block-sparse path: skipping the blocks of other documents.

Run ``python -m benchmarks.packed`` (``--quick`` for a short check). One row of
``T`` tokens holds documents of ``--doc`` tokens; the layer is causal, block-sparse.
Two ways to run the same packed attention, timed side by side (forward pass, after
a warm-up that traces and compiles):

- ``skipping``: ``layer(x, segment_ids=ids)``: blocks whose segments never meet are
  not computed (on JAX and TensorFlow the step is compiled, so the layer is given
  ``max_segment_length``; PyTorch runs eagerly and measures the ids);
- ``masked``: ``layer(x, attention_mask=same_segment)``: the pattern's blocks, with
  the dense ``(B, T, T)`` segment mask applied inside them (no skipping).

Prints the times, their ratio (masked / skipping: above 1 means skipping is faster)
and the blocks each computes per batch row. Both give the same outputs (checked).
"""

import argparse

import keras
import numpy as np
from keras import ops

import keras_attn
from benchmarks import timing


def measure(length, doc, block_size, repeats):
    """Median seconds of each way, and the blocks each computes per batch row."""
    layer = keras_attn.Attention(
        num_heads=8, key_dim=64, pattern="causal", block_sparse=True, block_size=block_size,
        max_segment_length=doc,
    )  # fmt: skip
    x = np.random.default_rng(0).normal(size=(1, length, 512)).astype("float32")
    ids = (np.arange(length) // doc)[None].astype("int32")  # (1, T)
    same = ids[:, :, None] == ids[:, None, :]  # (1, T, T)
    layer.build(x.shape)  # weights made outside the traced functions
    skipping = timing.compile_function(lambda x, ids: layer(x, segment_ids=ids), jit_compile=True)
    masked = timing.compile_function(
        lambda x, mask: layer(x, attention_mask=mask), jit_compile=True
    )
    out_skipping = ops.convert_to_numpy(skipping(x, ids))
    skip_plan = layer.last_plan  # set where the call is traced
    out_masked = ops.convert_to_numpy(masked(x, same))
    mask_plan = layer.last_plan
    np.testing.assert_allclose(out_skipping, out_masked, atol=1e-4)
    t_skip = timing.time_passes(lambda: timing.wait(skipping(x, ids)), repeats).median
    t_mask = timing.time_passes(lambda: timing.wait(masked(x, same)), repeats).median
    return {
        "T": length,
        "doc": doc,
        "skipping_s": t_skip,
        "masked_s": t_mask,
        "ratio": t_mask / t_skip,
        "blocks_skipping": skip_plan.segment_layout.computed_blocks,
        "blocks_masked": mask_plan.layout.computed_blocks,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small size, few repeats")
    parser.add_argument("--doc", type=int, default=256, help="tokens per packed document")
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args(argv)
    sizes, repeats, doc = ((512,), 2, 128) if args.quick else ((2048, 4096, 8192), 5, args.doc)
    block_size = 64 if args.quick else args.block_size
    print(f"backend={keras.backend.backend()} block_size={block_size} doc={doc} (causal, B=1)")
    print("T      skipping_s  masked_s  ratio  blocks (skipping / masked)")
    for length in sizes:
        r = measure(length, doc, block_size, repeats)
        print(
            f"{r['T']:<6} {r['skipping_s']:<11.4f} {r['masked_s']:<9.4f} {r['ratio']:<6.2f} "
            f"{r['blocks_skipping']} / {r['blocks_masked']}"
        )


if __name__ == "__main__":
    main()
