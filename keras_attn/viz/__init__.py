"""Pictures of attention.

- `render_mask`, `pattern_mask`: a pattern's mask drawn as text (``keras-attn pattern``).
- `plot_attention`, `attention_figure`: weights as heatmaps, a grid of layers by heads.
- `attention_viewer`: one self-contained HTML page (or Jupyter cell) in which to pick a
  layer and a head and hover a token, or an image patch, to see what it attends to.

Importing this package imports neither Keras nor matplotlib; each function imports
what it needs when called.
"""

from keras_attn.viz.heatmaps import attention_figure
from keras_attn.viz.heatmaps import plot_attention
from keras_attn.viz.masks import ALLOWED
from keras_attn.viz.masks import BLOCKED
from keras_attn.viz.masks import pattern_mask
from keras_attn.viz.masks import render_mask
from keras_attn.viz.viewer import AttentionViewer
from keras_attn.viz.viewer import attention_viewer

__all__ = [
    "ALLOWED",
    "BLOCKED",
    "AttentionViewer",
    "attention_figure",
    "attention_viewer",
    "pattern_mask",
    "plot_attention",
    "render_mask",
]
