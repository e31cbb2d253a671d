"""What the pictures are drawn from: attention weights per layer, and token labels.

The heatmaps and the viewer take weights in the forms a user has at hand: the
``(B, H, Tq, Tk)`` scores a layer returns with ``return_attention_scores=True``, a
list of them (one per layer) or a dict ``{layer name: scores}``. This module turns
any of them into one list of ``(name, (H, Tq, Tk) float32 array)`` and checks them
once, with errors that say what was received.
"""

import numpy as np

# Shown in place of whitespace, so that a space or a newline token stays visible.
_VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍"}


def to_numpy(x):
    """`x` as a numpy array, whatever backend tensor it is."""
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except (TypeError, RuntimeError, ValueError):  # e.g. a torch tensor on a GPU
        import keras

        return keras.ops.convert_to_numpy(x)


def attention_layers(weights, layer_names=None, example=0):
    """Read attention weights given per layer, and check them.

    Args:
        weights: One layer's weights, an array ``(Tq, Tk)``, ``(H, Tq, Tk)`` or
            ``(B, H, Tq, Tk)`` (as a layer returns with
            ``return_attention_scores=True``); or a list of such arrays, one per
            layer; or a dict ``{layer name: array}``.
        layer_names: Optional names of the layers, one per layer. Defaults to the
            dict's keys, else ``"layer 0"``, ``"layer 1"``, ...
        example: Which example of a batch ``(B, H, Tq, Tk)`` to take.

    Returns:
        List of ``(name, weights)`` with weights a float32 array ``(H, Tq, Tk)``;
        every layer has the same Tq and Tk.

    Raises:
        ValueError: for an empty list, a wrong rank, an example out of range,
            layers of different lengths, names that do not match the layers, or
            weights that are not finite.
    """
    if isinstance(weights, dict):
        names = [str(name) for name in weights]
        arrays = list(weights.values())
    elif isinstance(weights, (list, tuple)):
        names, arrays = None, list(weights)
    else:
        names, arrays = None, [weights]
    if not arrays:
        raise ValueError("`weights` holds no layer. Received: weights=[] (an empty list)")
    if layer_names is not None:
        names = [str(name) for name in layer_names]
        if len(names) != len(arrays):
            raise ValueError(
                f"`layer_names` must name each of the {len(arrays)} layers. "
                f"Received: layer_names={list(layer_names)!r}"
            )
    names = names or [f"layer {i}" for i in range(len(arrays))]
    layers = [
        (name, _heads(to_numpy(a), name, example)) for name, a in zip(names, arrays, strict=True)
    ]
    lengths = {w.shape[1:] for _, w in layers}
    if len(lengths) > 1:
        shapes = ", ".join(f"{name}: {w.shape}" for name, w in layers)
        raise ValueError(
            "Every layer must have the same numbers of queries and keys (Tq, Tk). "
            f"Received (H, Tq, Tk) per layer: {shapes}"
        )
    return layers


def _heads(array, name, example):
    """One layer's weights as float32 ``(H, Tq, Tk)``."""
    if array.ndim == 4:
        if not -array.shape[0] <= example < array.shape[0]:
            raise ValueError(
                f"`example` must index the batch of {array.shape[0]} of layer {name!r}. "
                f"Received: example={example}"
            )
        array = array[example]
    elif array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(
            f"The weights of layer {name!r} must be (Tq, Tk), (H, Tq, Tk) or (B, H, Tq, Tk). "
            f"Received: shape={array.shape}"
        )
    if 0 in array.shape:
        raise ValueError(f"The weights of layer {name!r} are empty. Received: shape={array.shape}")
    array = array.astype("float32")
    if not np.isfinite(array).all():
        raise ValueError(
            f"The weights of layer {name!r} must be finite. "
            f"Received: {int(np.size(array) - np.isfinite(array).sum())} NaN or inf values"
        )
    return array


def token_labels(tokens, length, argument="tokens"):
    """Labels for `length` positions: `tokens` as strings, or the positions' numbers.

    Args:
        tokens: None, or a sequence of `length` tokens (anything `str` accepts).
        length: The number of positions.
        argument: The argument's name, for the error message.

    Returns:
        List of `length` strings, whitespace made visible.
    """
    if tokens is None:
        return [str(i) for i in range(length)]
    if isinstance(tokens, str):
        raise ValueError(
            f"`{argument}` must be a sequence of tokens, not one string. "
            f"Received: {argument}={tokens!r} (use list(...) for characters)"
        )
    tokens = list(tokens)
    if len(tokens) != length:
        raise ValueError(
            f"`{argument}` must have one label per position ({length}). "
            f"Received: len({argument})={len(tokens)}"
        )
    return ["".join(_VISIBLE.get(c, c) for c in str(t)) for t in tokens]
