"""Examples: GPT, BERT and ViT assembled from keras_attn layers, with their training programs.

Run one with ``python -m examples.<name> <command> [flags]`` (``--help`` lists them).
Each example is a package: ``model.py`` (the model, read top to bottom), ``data.py``
(its datasets) and ``__main__.py`` (its commands). Shared pieces:

- `examples.common`: the attention config, the shared blocks, the command line,
  the run folder, devices and precision, the train recipe, side-by-side
  comparison and heatmaps.
- `examples.datasets`: datasets by TFDS name, with embedded local datasets
  (`examples.datasets.pydoc_text`) that need no network.
"""
