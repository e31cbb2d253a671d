"""What every example shares: the attention config, blocks, the command line, the recipes.

- `attention`: `AttentionConfig`, the attention of the model builders, checked
  once, and the layer it describes (any registered component, or Keras's own layer).
- `blocks`: `TransformerBlock`, the block of GPT, BERT and ViT.
- `layers`: the small layers they share (padding mask, positions, one token).
- `text`: the character tokenizer and language-model windows of GPT and BERT.
- `cli`: the flags every example takes and how a command fails.
- `run`: the run folder (``DIR.partial`` until it finishes), checkpoints, history.
- `devices`: ``--distribute`` and ``--mixed-precision``.
- `training`: the train recipe, written once.
- `compare`: training side by side with `keras.layers.MultiHeadAttention`.
- `heatmaps`: pictures of the attention weights of a trained model.

A model file (``examples/<name>/model.py``) imports `attention`, `blocks` and
`layers` only: nothing about command lines or run folders.
"""
