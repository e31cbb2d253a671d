"""Examples: BERT, GPT and ViT assembled from keras_attn layers, with their training programs.

Run one with ``python -m examples.<name> <command> [flags]`` (``--help`` lists them).
Shared pieces:

- `examples.training`: the command line, run folder, devices and precision
  conventions every example follows.
- `examples.datasets`: datasets by TFDS name, with embedded local datasets
  (`examples.datasets.pydoc_text`) that need no network.
- `examples.text`: the character tokenizer and language-model windows of the
  text examples.
"""
