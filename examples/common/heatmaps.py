"""Pictures of a trained model's attention: its weights on held-out inputs, as heatmaps.

`attention_weights(model, inputs)` reads the weights of every attention layer of a
functional model; `save_heatmaps` draws weights (from there, or from a model's
own method, as GPT's blocks give them) with `keras_attn.viz.plot_attention`.
"""

import os

import keras


def _attention_layers(model):
    from keras_attn import Attention

    return [
        layer
        for layer in model.layers
        if isinstance(layer, (Attention, keras.layers.MultiHeadAttention))
    ]


def attention_weights(model, inputs):
    """The attention weights of every attention layer of a functional `model` on `inputs`.

    Each layer is called again on the tensors it received in the model, with the
    same arguments plus ``return_attention_scores=True`` and ``training=False``.

    Returns:
        Dict ``{layer name: weights as numpy (B, H, Tq, Tk)}``, in model order.
    """
    weights = {}
    for layer in _attention_layers(model):
        node = layer._inbound_nodes[0]
        symbolic = node.arguments.keras_tensors
        probe = keras.Model(model.input, symbolic)
        values = probe(inputs, training=False)
        values = values if isinstance(values, (list, tuple)) else [values]
        by_id = {id(t): v for t, v in zip(symbolic, values, strict=True)}

        def fill(x):
            return by_id.get(id(x), x) if isinstance(x, keras.KerasTensor) else x

        args, kwargs = node.arguments.convert(fill)
        kwargs = {**kwargs, "return_attention_scores": True, "training": False}
        outputs = layer(*args, **kwargs)
        weights[layer.name] = keras.ops.convert_to_numpy(outputs[1]).astype("float32")
    return weights


def save_heatmaps(
    weights,
    directory,
    tokens=None,
    examples=2,
    max_heads=4,
    filename="{layer}-example{example}.png",
    title="{layer}, example {example}",
):
    """Write one PNG per (layer, example) of `weights` to `directory`.

    Args:
        weights: Dict ``{layer name: (B, H, Tq, Tk)}``.
        tokens: Optional ``tokens[i]`` = labels of example i's positions.
        examples: How many examples of the batch to draw.
        max_heads: How many heads per layer to draw.
        filename, title: Formats with ``{layer}`` and ``{example}``.

    Returns:
        The list of paths written.
    """
    from keras_attn import viz

    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, layer_weights in weights.items():
        for i in range(min(examples, layer_weights.shape[0])):
            path = os.path.join(directory, filename.format(layer=name, example=i))
            labels = tokens[i] if tokens is not None else None
            viz.plot_attention(
                layer_weights[i, :max_heads],
                path,
                tokens=labels,
                title=title.format(layer=name, example=i),
            )
            paths.append(path)
    return paths


def save_attention_heatmaps(model, inputs, directory, tokens=None, examples=2, max_heads=4):
    """`save_heatmaps` of the `attention_weights` of a functional `model` on `inputs`."""
    return save_heatmaps(
        attention_weights(model, inputs),
        directory,
        tokens=tokens,
        examples=examples,
        max_heads=max_heads,
    )
