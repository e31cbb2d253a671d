"""Pictures of a trained model's attention: its weights on held-out inputs.

`attention_weights(model, inputs)` reads the weights of every block of an
example's model (GPT, BERT's encoder, ViT: each keeps its
`examples.common.blocks.TransformerBlock`s in ``model.blocks`` and says what
they take with ``model.embed``); `save_heatmaps` draws weights as one grid of
layers x heads per example with `keras_attn.viz.plot_attention`, and writes the
interactive viewer (`keras_attn.viz.attention_viewer`, one self-contained
``viewer.html``) beside it.
"""

import os

import keras


def attention_weights(model, inputs):
    """The attention weights of every block of an example's `model` on `inputs`.

    The model embeds the inputs (``x, block_arguments = model.embed(inputs)``);
    each block of ``model.blocks`` then runs in turn on the previous one's output,
    with those arguments, ``return_attention_scores=True`` and ``training=False``:
    the computation of the model itself, up to its last block.

    Returns:
        Dict ``{block name: weights as numpy float32 (B, H, Tq, Tk)}``, in model order.
    """
    x, arguments = model.embed(inputs, training=False)
    weights = {}
    for block in model.blocks:
        x, w = block(x, **arguments, return_attention_scores=True, training=False)
        weights[block.name] = keras.ops.convert_to_numpy(w).astype("float32")
    return weights


def save_heatmaps(
    weights,
    directory,
    tokens=None,
    examples=2,
    max_heads=4,
    filename="example{example}.png",
    title="attention weights, example {example}",
    image=None,
):
    """Write one PNG per example of `weights` (a grid of layers x heads) and ``viewer.html``.

    Args:
        weights: Dict ``{layer name: (B, H, Tq, Tk)}``.
        tokens: Optional ``tokens[i]`` = labels of example i's positions.
        examples: How many examples of the batch to draw.
        max_heads: How many heads per layer to draw.
        filename, title: Formats with ``{example}``.
        image: Optional ``(B, height, width[, channels])`` images whose patches the
            positions are (ViT), shown under the viewer's patches.

    Returns:
        The list of paths written (the PNGs, then the viewer).
    """
    from keras_attn import viz

    os.makedirs(directory, exist_ok=True)
    paths = []
    batch = min(layer.shape[0] for layer in weights.values())
    for i in range(min(examples, batch)):
        path = os.path.join(directory, filename.format(example=i))
        viz.plot_attention(
            {name: w[i] for name, w in weights.items()},
            path,
            tokens=tokens[i] if tokens is not None else None,
            title=title.format(example=i),
            heads=max_heads,
        )
        paths.append(path)
    viewer = os.path.join(directory, "viewer.html")
    viz.attention_viewer(
        {name: w[0] for name, w in weights.items()},
        tokens[0] if tokens is not None else None,
        image=None if image is None else image[0],
        title="keras_attn attention viewer: example 0",
        path=viewer,
    )
    paths.append(viewer)
    return paths


def save_attention_heatmaps(
    model, inputs, directory, tokens=None, examples=2, max_heads=4, image=None
):
    """`save_heatmaps` of the `attention_weights` of an example's `model` on `inputs`."""
    return save_heatmaps(
        attention_weights(model, inputs),
        directory,
        tokens=tokens,
        examples=examples,
        max_heads=max_heads,
        image=image,
    )
