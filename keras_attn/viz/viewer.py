"""An interactive attention viewer: one self-contained HTML page, or a Jupyter cell.

Pick a layer and a head; hover a token to see what it attends to (lines to the keys,
each key tinted and labelled with its weight), or hover a key to see what attends to
it -- the "head view" of bertviz. For a ViT, the keys are the patches of an image:
hovering a patch tints the patches it attends to. The page needs no network.
"""

import base64
import html
import json
import math
import struct
import uuid
import zlib

import numpy as np

from keras_attn.viz.inputs import attention_layers
from keras_attn.viz.inputs import to_numpy
from keras_attn.viz.inputs import token_labels
from keras_attn.viz.page import DOCUMENT
from keras_attn.viz.page import SCRIPT
from keras_attn.viz.page import STYLE
from keras_attn.viz.page import TEMPLATE

IMAGE_SIDE = 384  # pixels along the image's longer side in the page


def attention_viewer(
    weights,
    tokens=None,
    *,
    key_tokens=None,
    image=None,
    patch_grid=None,
    layer_names=None,
    example=0,
    title="keras_attn attention viewer",
    path=None,
):
    """An interactive view of attention weights, as one self-contained HTML page.

    Text: queries on the left, keys on the right; hovering a query draws its
    weights over the keys, hovering a key draws the weights it receives. Image
    (with `image` or `patch_grid`): the keys are the patches of a
    ``(rows, cols)`` grid, plus any extra tokens before them (e.g. ``[CLS]``),
    shown as chips; hovering a patch or a chip tints what it attends to.

    Args:
        weights: One layer's weights, ``(Tq, Tk)``, ``(H, Tq, Tk)`` or
            ``(B, H, Tq, Tk)`` (as a layer returns them with
            ``return_attention_scores=True``); or a list of them, one per layer;
            or a dict ``{layer name: weights}``.
        tokens: Optional labels of the queries (and of the keys, unless
            `key_tokens`), one per position.
        key_tokens: Optional labels of the keys, when they differ from the queries.
        image: Optional image the patches were cut from: ``(height, width)``,
            ``(height, width, 1|3|4)``, uint8, or float in ``[0, 1]`` (other
            float ranges are stretched to their min..max).
        patch_grid: ``(rows, cols)`` of patches. The last ``rows * cols`` keys are
            the patches in row-major order; keys before them are extra tokens.
            Without it, an image's grid is the largest square that fits Tk
            (``Tk = n * n`` or ``1 + n * n``).
        layer_names: Optional names of the layers (default: the dict's keys).
        example: Which example of a batch ``(B, H, Tq, Tk)`` to show.
        title: The page's title.
        path: If given, the page is also written there.

    Returns:
        An `AttentionViewer`: shown by Jupyter as is; ``.html`` is the page,
        ``.save(path)`` writes it.
    """
    layers = attention_layers(weights, layer_names, example)
    _, query_length, key_length = layers[0][1].shape
    image_spec = None
    if image is not None or patch_grid is not None:
        image_spec = _image_spec(image, patch_grid, query_length, key_length)
        labels = _patch_labels(tokens, key_tokens, key_length, image_spec)
        query_labels = key_labels = labels
    else:
        if key_tokens is None and tokens is not None and key_length != query_length:
            raise ValueError(
                f"`tokens` labels the {query_length} queries, but there are {key_length} "
                f"keys: give `key_tokens` too. Received: len(tokens)={len(list(tokens))}"
            )
        query_labels = token_labels(tokens, query_length)
        key_labels = token_labels(key_tokens if key_tokens is not None else tokens, key_length)
    spec = {
        "queryLength": query_length,
        "keyLength": key_length,
        "queryTokens": query_labels,
        "keyTokens": key_labels,
        "layers": [
            {"name": name, "heads": int(w.shape[0]), "data": _base64_float32(w)}
            for name, w in layers
        ],
        "image": image_spec,
    }
    viewer = AttentionViewer(spec, title=title)
    if path is not None:
        viewer.save(path)
    return viewer


class AttentionViewer:
    """A page made by `attention_viewer`: shown by Jupyter, saved as one HTML file.

    Args:
        spec: What the page shows (made by `attention_viewer`).
        title: The page's title.
    """

    def __init__(self, spec, title="keras_attn attention viewer"):
        self._spec = spec
        self.title = title
        self.path = None

    @property
    def num_layers(self):
        return len(self._spec["layers"])

    @property
    def shape(self):
        """``(Tq, Tk)``: the numbers of queries and keys shown."""
        return self._spec["queryLength"], self._spec["keyLength"]

    def fragment(self, root_id=None):
        """The viewer as an HTML fragment (a ``div``).

        Args:
            root_id: The id of its root element; by default a fresh one each call, so
                that the same viewer can be shown twice in one notebook.
        """
        data = json.dumps(self._spec, separators=(",", ":"))
        # A token such as "</script>" must not end the data block.
        data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        root_id = root_id or f"ka-viewer-{uuid.uuid4().hex[:12]}"
        hint = "hover a patch" if self._spec["image"] else "hover a token"
        return TEMPLATE.format(
            root_id=root_id,
            style=STYLE,
            hint=f"{hint} to see what it attends to",
            data=data,
            script=SCRIPT.replace("__ROOT_ID__", root_id),
        )

    @property
    def html(self):
        """The whole page, one self-contained HTML document (the same text each time)."""
        fragment = self.fragment(root_id="ka-viewer")
        return DOCUMENT.format(title=html.escape(self.title), fragment=fragment)

    def save(self, path):
        """Write the page to `path` (UTF-8) and return `path`."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.html)
        self.path = path
        return path

    def _repr_html_(self):
        return self.fragment()

    def __repr__(self):
        heads = [layer["heads"] for layer in self._spec["layers"]]
        kind = "image" if self._spec["image"] else "text"
        layers = f"{self.num_layers} layer" + ("s" if self.num_layers != 1 else "")
        return f"<AttentionViewer {kind}: {layers}, heads {heads}, (Tq, Tk)={self.shape}>"


def _base64_float32(weights):
    return base64.b64encode(np.ascontiguousarray(weights, "<f4").tobytes()).decode("ascii")


def _image_spec(image, patch_grid, query_length, key_length):
    """Where the patches are and what is drawn under them."""
    if query_length != key_length:
        raise ValueError(
            "The image view shows self-attention over patches, so Tq must equal Tk. "
            f"Received: (Tq, Tk)=({query_length}, {key_length})"
        )
    if patch_grid is None:
        patch_grid = _square_grid(key_length)
    try:
        rows, cols = (int(n) for n in patch_grid)
    except (TypeError, ValueError):
        raise ValueError(
            f"`patch_grid` must be (rows, cols). Received: patch_grid={patch_grid!r}"
        ) from None
    if rows <= 0 or cols <= 0 or rows * cols > key_length:
        raise ValueError(
            f"`patch_grid` must be positive and hold at most Tk={key_length} patches. "
            f"Received: patch_grid={patch_grid!r}"
        )
    if image is None:
        scale = IMAGE_SIDE / max(rows, cols)
        return {
            "rows": rows,
            "cols": cols,
            "width": round(cols * scale),
            "height": round(rows * scale),
            "src": None,
        }
    pixels = _image_pixels(image)
    height, width = pixels.shape[:2]
    scale = IMAGE_SIDE / max(height, width)
    return {
        "rows": rows,
        "cols": cols,
        "width": round(width * scale),
        "height": round(height * scale),
        "src": "data:image/png;base64," + base64.b64encode(_png(pixels)).decode("ascii"),
    }


def _square_grid(key_length):
    for extra in (0, 1):
        side = math.isqrt(key_length - extra)
        if side > 0 and side * side == key_length - extra:
            return side, side
    raise ValueError(
        f"Cannot tell the patch grid from Tk={key_length} (neither n*n nor 1 + n*n): "
        "give `patch_grid=(rows, cols)`. Received: patch_grid=None"
    )


def _image_pixels(image):
    """`image` as uint8 ``(height, width, 3|4)``."""
    pixels = to_numpy(image)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    if pixels.ndim != 3 or pixels.shape[-1] not in (3, 4) or 0 in pixels.shape:
        raise ValueError(
            "`image` must be (height, width) or (height, width, 1|3|4). "
            f"Received: image.shape={pixels.shape}"
        )
    if pixels.dtype == np.uint8:
        return pixels
    pixels = pixels.astype("float64")
    if not np.isfinite(pixels).all():
        raise ValueError("`image` must be finite. Received: an image with NaN or inf")
    low, high = pixels.min(), pixels.max()
    if low < 0 or high > 1:  # e.g. 0..255, or normalized to -1..1: stretch what is there
        pixels = (pixels - low) / ((high - low) or 1.0)
    return np.round(pixels * 255).astype("uint8")


def _png(pixels):
    """A PNG file of uint8 ``(height, width, 3|4)`` pixels (no dependency needed)."""
    height, width, channels = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))  # filter: none

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    color_type = 2 if channels == 3 else 6
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 6))
        + chunk(b"IEND", b"")
    )


def _patch_labels(tokens, key_tokens, key_length, image_spec):
    """Labels of the keys in the image view: extra tokens, then patches "(row, col)"."""
    given = key_tokens if key_tokens is not None else tokens
    if given is not None:
        return token_labels(given, key_length, "key_tokens" if key_tokens is not None else "tokens")
    cols = image_spec["cols"]
    extra = key_length - image_spec["rows"] * cols
    names = ["[CLS]"] if extra == 1 else [f"[extra {i}]" for i in range(extra)]
    patches = [f"patch ({p // cols}, {p % cols})" for p in range(key_length - extra)]
    return names + patches
