"""Position encodings: how queries and keys carry their positions before scoring.

A position encoding is called as ``encoding(query, key, positions)`` on heads
``(..., T, D)`` with integer absolute positions broadcastable to ``(..., T)``, and
returns the encoded ``(query, key)``. The attention layer applies it to the projected
heads before any path runs, and to keys before they are written to a KV cache.
"""

from keras import ops

from keras_attn.components import PositionEncoding
from keras_attn.components import builtin
from keras_attn.hookspecs import hookimpl


@builtin("position_encoding")
class Rope(PositionEncoding):
    """Rotary position embedding (RoPE; Su et al., 2021), as KerasHub's `RotaryEmbedding`.

    The features of each head are split into two halves ``(x1, x2)``, rotated pair by
    pair by the angle ``position * max_wavelength ** (-2i / D) / scaling_factor``:
    ``(x1 cos - x2 sin, x2 cos + x1 sin)``. The score of a rotated query and key then
    depends on their positions only through ``query - key``. The angles and the
    rotation are computed in float32 (positions in the thousands lose their digits in
    float16), and the result is cast back to the heads' dtype.

    Args:
        max_wavelength: The longest wavelength of the rotations (RoPE's ``base`` or
            ``theta``).
        scaling_factor: Divides the positions (linear position interpolation, to
            stretch a model to longer contexts).
    """

    name = "rope"

    def __init__(self, max_wavelength=10000, scaling_factor=1.0, **kwargs):
        super().__init__(**kwargs)
        if not max_wavelength > 0:
            raise ValueError(
                f"`max_wavelength` must be positive. Received: max_wavelength={max_wavelength}"
            )
        if not scaling_factor > 0:
            raise ValueError(
                f"`scaling_factor` must be positive. Received: scaling_factor={scaling_factor}"
            )
        self.max_wavelength = max_wavelength
        self.scaling_factor = float(scaling_factor)

    def check_head_dim(self, head_dim):
        if head_dim is not None and head_dim % 2:
            raise ValueError(
                "rope rotates pairs of features, so the head dim (key_dim) must be even. "
                f"Received: head_dim={head_dim}"
            )

    def build(self, query_shape, key_shape=None, positions_shape=None):
        self.check_head_dim(query_shape[-1])

    def call(self, query, key, positions=None):
        if positions is None:
            positions = ops.arange(ops.shape(query)[-2], dtype="int32")
        angles = self._angles(query.shape[-1], positions)
        return self._rotate(query, angles), self._rotate(key, angles)

    def _angles(self, depth, positions):
        """``(..., T, D / 2)`` float32 rotation angles for positions ``(..., T)``."""
        self.check_head_dim(depth)
        exponent = ops.arange(0, depth, 2, dtype="float32") / float(depth)
        inverse_frequency = ops.power(float(self.max_wavelength), -exponent) / self.scaling_factor
        return ops.expand_dims(ops.cast(positions, "float32"), -1) * inverse_frequency

    def _rotate(self, x, angles):
        x32 = ops.cast(x, "float32")
        x1, x2 = ops.split(x32, 2, axis=-1)  # (..., T, D / 2) each
        cos, sin = ops.cos(angles), ops.sin(angles)
        rotated = ops.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return ops.cast(rotated, x.dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "max_wavelength": self.max_wavelength,
            "scaling_factor": self.scaling_factor,
        }


@hookimpl
def register_position_encodings(register):
    register(Rope)
