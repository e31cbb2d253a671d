"""Decide once, run once: the path an attention takes, and running it.

`plan` looks at the components, the lengths and the call's options and decides how
the attention runs (and, for the block-sparse path, which blocks it computes);
`attend` runs that plan. Layers call these two and nothing else of the engine, and
the kernels below never decide anything (as FlexAttention builds its ``BlockMask``
once and hands it to the kernel). The paths, all exact and all agreeing:

- ``native``: the backend's own exact kernel for this pattern (`keras_attn.native`:
  cuDNN's sliding-window flash kernel through ``jax.nn.dot_product_attention`` on a
  GPU; PyTorch's FlexAttention with a BlockMask from the pattern's ``block_mask``
  where CUDA is visible, or compiled on a CPU for calls that need no gradient
  (``Call.needs_grad``: inference under ``torch.no_grad()``); Splash attention with a mask made from the pattern on a
  TPU), named in the plan's ``kernel``;
- ``fused``: `keras.ops.dot_product_attention` (`keras_attn.kernels.fused_attention`;
  flash kernels on GPU/TPU where the backend has them) when a fused kernel computes
  exactly these components (`Components.fused_scale`);
- ``block_sparse``: only the score blocks the pattern can reach
  (`keras_attn.block_sparse`, on a `keras_attn.block_layout.BlockLayout`);
- ``dense``: the exact masked reference (`keras_attn.kernels.dense_attention`).
"""

import dataclasses
import logging
import os
import warnings
from typing import NamedTuple

import numpy as np
from keras import ops

from keras_attn import block_layout as block_layout_module
from keras_attn import devices
from keras_attn import kernels
from keras_attn import native
from keras_attn import pallas
from keras_attn import segments as segments_module
from keras_attn.block_sparse import block_sparse_attention
from keras_attn.masks import combine_masks
from keras_attn.positions import make_positions

logger = logging.getLogger("keras_attn")

__all__ = [
    "PATHS",
    "Call",
    "Heads",
    "Plan",
    "Settings",
    "attend",
    "block_sparse_pays_off",
    "plan",
    "run",
]

PATHS = ("native", "fused", "block_sparse", "dense")

# The auto mode takes the block-sparse path when it computes at most this fraction of
# the blocks of the dense score matrix...
MAX_COMPUTED_FRACTION = 0.5
# ...and the score matrix has at least this many blocks (gathers cost more than they
# save on small inputs).
MIN_BLOCKS = 16
# Where the fused kernel would run but computes every score (on a CPU), the auto mode
# takes the block-sparse path when it computes at most this fraction of the blocks:
# a causal pattern computes 0.625-0.67 of them from 8 x 8 blocks on (T >= 1024 with
# blocks of 128), and was then faster than the fused kernel on both TensorFlow and JAX.
MAX_FRACTION_OVER_FUSED = 0.7


class Plan(NamedTuple):
    """How one attention call runs, decided by `plan` and carried out by `attend`.

    Attributes:
        path: One of `PATHS`.
        components: The `keras_attn.components.Components` of the call.
        query_offset: Absolute position of the first query (int or scalar tensor).
        layout: The `keras_attn.block_layout.BlockLayout` (block-sparse path), or None.
        scale: The fused or native kernel's scale, or None.
        flash_attention: Passed to the fused kernel.
        kernel: The native kernel's name (``"jax_cudnn"``, ``"jax_splash"``,
            ``"torch_flex_attention"``), or None.
        window: The native kernel's ``(left, right)`` sliding window, or None.
        segment_layout: With segment ids on the block-sparse path, the
            `keras_attn.block_layout.SegmentLayout` that skips the blocks whose
            segments never meet; None otherwise.
        fallback_from: The native or Pallas kernel that failed on this machine
            (`run` then took this portable plan instead), or None.
    """

    path: str
    components: object
    query_offset: object = 0
    layout: object = None
    scale: object = None
    flash_attention: object = None
    kernel: object = None
    window: object = None
    segment_layout: object = None
    fallback_from: object = None


def _static_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_empty(*lengths):
    return any(_static_int(n) and n == 0 for n in lengths)


def _block_sparse_decision(pattern, query_length, key_length, mode, block_size, query_offset):
    """True/False where the answer needs no layout, else None (the layout decides)."""
    if mode is False:
        return False
    static = _static_int(query_length) and _static_int(key_length) and _static_int(query_offset)
    if mode is True:
        if not static:
            raise ValueError(
                "block_sparse=True needs query and key lengths and a query offset known "
                "when the function is traced (Python ints), because the blocks to "
                f"compute are worked out ahead of time. Received: query_length={query_length}, "
                f"key_length={key_length}, query_offset={query_offset!r}"
            )
        return True
    if not static or pattern.kernel_form == "full":
        return False
    nq = block_layout_module.num_blocks(query_length, block_size)
    nk = block_layout_module.num_blocks(key_length, block_size)
    if nq * nk < MIN_BLOCKS:
        return False
    return None


def block_sparse_pays_off(
    pattern,
    query_length,
    key_length,
    mode="auto",
    block_size=128,
    query_offset=0,
    max_fraction=MAX_COMPUTED_FRACTION,
):
    """Whether the block-sparse path should run this pattern at these lengths.

    Args:
        mode: ``"auto"``: when it computes at most `max_fraction` of the blocks, the
            score matrix has at least `MIN_BLOCKS` blocks and the lengths and query
            offset are known Python ints. ``True``: always (raises if the lengths or
            offset are not static). ``False``: never.

    Raises:
        ValueError: ``mode=True`` with lengths or an offset known only at run time.
    """
    decided = _block_sparse_decision(
        pattern, query_length, key_length, mode, block_size, query_offset
    )
    if decided is not None:
        return decided
    layout = block_layout_module.block_layout(
        pattern, query_length, key_length, block_size, query_offset
    )
    return layout.computed_fraction <= max_fraction


def choose_path(components, call=None, settings=None, machine=None, **facts):
    """The path that runs this attention: one of `PATHS` (``plan(...).path``; same arguments)."""
    return plan(components, call, settings, machine, **facts).path


@dataclasses.dataclass(frozen=True)
class Settings:
    """A layer's settings for the planner (fixed when the layer is made).

    Attributes:
        block_sparse: ``"auto"``, True (insist on the block-sparse path) or False (never).
        block_size: Block size of the block-sparse path.
        flash_attention: Passed to the fused kernel (None lets the backend decide;
            False also rules out the native kernels).
        max_segment_length: The layer's bound on segment lengths (tokens), or None.
        name: The caller's name (the layer's), for warnings and the debug log.
    """

    block_sparse: object = "auto"
    block_size: int = 128
    flash_attention: object = None
    max_segment_length: object = None
    name: object = None


@dataclasses.dataclass(frozen=True)
class Call:
    """The facts of one attention call that the plan depends on.

    Attributes:
        query_length, key_length: Tq and Tk (Python ints, or None/tensors when known
            only at run time, which rules out the block-sparse path).
        head_dim: D of queries and keys; value_dim: Dv (None: D).
        dtype: The heads' dtype (the native kernels need 16-bit inputs), or None.
        query_offset: Absolute position of the first query (the cache index).
        has_mask: Whether a data mask (padding, explicit, cache) comes with the call.
        segments: The call's `keras_attn.segments.Segments` (packed sequences), or None.
        return_weights: Whether the caller needs the weights.
        training: Whether dropout is active.
        needs_grad: Whether a gradient may be taken through the call (False under
            PyTorch's ``torch.no_grad()``, e.g. Keras's predict and generation; always
            True on the other backends, whose gradients are taken after the call).
    """

    query_length: object
    key_length: object
    head_dim: int
    value_dim: object = None
    dtype: object = None
    query_offset: object = 0
    has_mask: bool = False
    segments: object = None
    return_weights: bool = False
    training: object = None
    needs_grad: bool = True

    @classmethod
    def of(cls, heads, training=None, return_weights=False):
        """The facts of a call on `Heads`."""
        return cls(
            query_length=heads.query.shape[1],
            key_length=heads.key.shape[1],
            head_dim=heads.query.shape[-1],
            value_dim=heads.value.shape[-1],
            dtype=heads.query.dtype,
            query_offset=heads.query_offset,
            has_mask=heads.mask is not None or heads.segments is not None,
            segments=heads.segments,
            return_weights=return_weights,
            training=training,
            needs_grad=_grad_enabled(),
        )


def _grad_enabled():
    """PyTorch's ``torch.is_grad_enabled()``; True on the other backends."""
    if devices.actual().backend != "torch":
        return True
    import torch

    return torch.is_grad_enabled()


class Heads(NamedTuple):
    """Projected heads and what comes with them, as a layer hands them to `run`.

    Attributes:
        query: ``(B, Tq, H, D)``; key ``(B, Tk, H, D)``; value ``(B, Tk, H, Dv)``
            (key/value heads already repeated to H).
        mask: Bool data mask broadcastable to ``(B, H, Tq, Tk)`` (padding, explicit
            masks, cache validity; `keras_attn.masks`), or None. Not the pattern.
        segments: `keras_attn.segments.Segments` of packed sequences, or None.
        query_offset: Absolute position of the first query (int or scalar tensor).
    """

    query: object
    key: object
    value: object
    mask: object = None
    segments: object = None
    query_offset: object = 0


def run(components, heads, settings=None, *, training=None, return_weights=False, machine=None):
    """Plan and run one attention: the engine's single entry for layers.

    Args:
        components: `keras_attn.components.Components` (the call's pattern, dropout).
        heads: `Heads`.
        settings: The layer's `Settings` (defaults: ``Settings()``).
        training: Whether dropout (and training-only noise) is active.
        return_weights: Whether to return the weights.
        machine: The `keras_attn.devices.Machine` to plan for (default: `devices.current()`).

    Returns:
        ``(output (B, Tq, H, Dv), weights (B, H, Tq, Tk) or None, plan)``.
    """
    # Score_mods see positions restarted at each segment (`reset_positions`).
    relative = segments_module.relative_score_mods(
        components.score_mods, heads.segments, heads.query_offset
    )
    if relative is not None:
        components = components.replace(score_mods=relative)
    call = Call.of(heads, training, return_weights)
    machine = devices.current() if machine is None else machine
    if machine.native_kernels and devices.exporting():  # no exported op for them
        machine = dataclasses.replace(machine, native_kernels=False)
    the_plan = plan(components, call, settings, machine)

    def run_plan(a_plan):
        return attend(
            a_plan,
            heads.query,
            heads.key,
            heads.value,
            heads.mask,
            segments=heads.segments,
            training=training,
            return_weights=return_weights,
        )

    try:
        if the_plan.kernel is not None:
            _check_kernel_compiles(the_plan, heads)
        output, weights = run_plan(the_plan)
    except Exception as error:  # a kernel that cannot run here: the portable paths can
        if the_plan.kernel is None or not kernel_fallback_enabled():
            raise
        _warn_kernel_failed(settings, the_plan.kernel, error)
        portable = dataclasses.replace(machine, native_kernels=False)
        the_plan = plan(components, call, settings, portable)._replace(
            fallback_from=the_plan.kernel
        )
        output, weights = run_plan(the_plan)
    return output, weights, the_plan


FALLBACK_ENV_VAR = "KERAS_ATTN_KERNEL_FALLBACK"


def kernel_fallback_enabled():
    """Whether a failing native/Pallas kernel falls back to a portable path (the default).

    ``KERAS_ATTN_KERNEL_FALLBACK=0`` turns it off, so the kernel's own error is raised
    (for people debugging kernels).
    """
    return os.environ.get(FALLBACK_ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


_warned_kernels = set()


def _warn_kernel_failed(settings, kernel, error):
    name = None if settings is None else settings.name
    if (name, kernel) in _warned_kernels:
        return
    _warned_kernels.add((name, kernel))
    warnings.warn(
        f"keras_attn layer {name!r}: the {kernel} kernel failed on this machine "
        f"({type(error).__name__}: {str(error)[:500]}); running the portable path "
        f"instead (layer.last_plan.fallback_from says so). Set {FALLBACK_ENV_VAR}=0 to "
        "raise the kernel's error instead. (Shown once per layer and kernel.)",
        RuntimeWarning,
        stacklevel=4,
    )


_compiled_kernels = {}


def _check_kernel_compiles(the_plan, heads):
    """On JAX, compile the plan's kernel once for these shapes, so a compile error is caught here.

    A kernel traced inside the user's ``jax.jit`` is compiled with the whole program,
    outside any layer; compiling it alone first, once per (kernel, shapes, dtypes),
    lets `run` fall back instead of failing the user's program. On a CPU the kernels
    run through XLA or in interpret mode and fail, if at all, while traced: no check.
    """
    actual = devices.actual()
    if actual.backend != "jax" or actual.platform == "cpu":
        return
    import jax

    structs = [
        jax.ShapeDtypeStruct(tuple(x.shape), x.dtype) for x in (heads.query, heads.key, heads.value)
    ]
    if any(d is None for s_ in structs for d in s_.shape):
        return
    key = (
        the_plan.kernel,
        the_plan.window,
        the_plan.scale,
        id(the_plan.layout),
        the_plan.query_offset,
        tuple((s_.shape, str(s_.dtype)) for s_ in structs),
    )
    if key in _compiled_kernels:
        if _compiled_kernels[key] is not None:
            raise _compiled_kernels[key]
        return
    mask = heads.mask

    def kernel(q, k, v):
        return attend(the_plan, q, k, v, None if mask is None else ops.ones(mask.shape, "bool"))

    try:
        jax.jit(kernel).lower(*structs).compile()
    except Exception as error:
        _compiled_kernels[key] = error
        raise
    _compiled_kernels[key] = None


def plan(components, call=None, settings=None, machine=None, **facts):
    """Decide how this attention runs.

    ``block_sparse=True`` insists on the block-sparse path, even where the fused one
    would do; ``False`` never takes it. With ``"auto"``, a fusable sparse pattern
    (causal) still takes the block-sparse path on a CPU, where the fused kernel
    computes the whole score matrix, once it skips enough blocks
    (`MAX_FRACTION_OVER_FUSED`), unless ``flash_attention`` is True.

    Args:
        components: `keras_attn.components.Components`, with the call's pattern.
        call: The call's facts, a `Call`.
        settings: The layer's `Settings` (default ``Settings()``).
        machine: The `keras_attn.devices.Machine` (default `keras_attn.devices.current()`).
        **facts: Instead of `call` and `settings`, their fields by name (for
            interactive use and tests), e.g. ``plan(c, query_length=64,
            key_length=64, head_dim=8, block_sparse=True)``.

    With segment ids and ``block_sparse="auto"``, the block-sparse path is also taken
    for full and causal patterns (where no fused kernel would skip work: off a CPU the
    fused flash kernel is kept) once the blocks whose segments meet are at most
    `MAX_COMPUTED_FRACTION` (`MAX_FRACTION_OVER_FUSED` against a CPU's fused kernel) of
    the score matrix: measured on concrete ids, bounded by `max_segment_length` on
    traced ones.

    On a TPU, scaled_dot + softmax without score_mods, dropout or weights runs
    natively on Splash attention for any pattern (``kernel="jax_splash"``), with
    lengths and query offset known when traced and no data mask.

    A causal sliding window (`keras_attn.patterns.Local(w, causal=True)`) with
    scaled_dot + softmax runs natively, on cuDNN's own sliding-window kernel, where
    JAX sees an NVIDIA GPU and the inputs are 16-bit, with no data mask, no cache
    offset and ``Tq == Tk``. (cuDNN refuses a right window without its causal mask,
    so two-sided windows take another path.)

    On the block-sparse path, the opt-in Pallas kernel (`keras_attn.pallas`) is
    chosen here too (``kernel="pallas_block_sparse"``) where the machine takes it.

    Where ``block_sparse="auto"`` would consider the block-sparse path for this
    pattern but the lengths are unknown when the function is traced (TensorFlow
    retraces ``model.fit``/``predict`` with a length of None once it sees a second
    length), the plan falls back to whole ``Tq x Tk`` scores and warns once per
    layer name (`warn_unknown_lengths`), never silently.

    Returns:
        A `Plan`.

    Raises:
        TypeError: ``facts`` with a name that is neither a `Call` nor a `Settings` field.
    """
    call, settings = _from_facts(call, settings, facts)
    machine = devices.current() if machine is None else machine
    return _Planner(components, call, settings, machine).plan()


def _from_facts(call, settings, facts):
    call_fields = {f.name for f in dataclasses.fields(Call)}
    setting_fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = set(facts) - call_fields - setting_fields
    if unknown:
        raise TypeError(
            f"plan() got unknown facts {sorted(unknown)}; expected fields of "
            f"dispatch.Call {sorted(call_fields)} or dispatch.Settings {sorted(setting_fields)}"
        )
    call_facts = {k: v for k, v in facts.items() if k in call_fields}
    setting_facts = {k: v for k, v in facts.items() if k in setting_fields}
    if call is None:
        call = Call(**call_facts)
    elif call_facts:
        call = dataclasses.replace(call, **call_facts)
    settings = Settings() if settings is None else settings
    if setting_facts:
        settings = dataclasses.replace(settings, **setting_facts)
    return call, settings


class _Planner:
    """One decision: the components, the call's facts, the layer's settings, the machine."""

    def __init__(self, components, call, settings, machine):
        self.components = components
        self.call = call
        self.settings = settings
        self.machine = machine
        self.pattern = components.pattern
        self.value_dim = call.head_dim if call.value_dim is None else call.value_dim
        self._layout = None

    @property
    def static(self):
        c = self.call
        return all(_static_int(n) for n in (c.query_length, c.key_length, c.query_offset))

    def layout(self):
        """The block layout of the pattern, built once and reused by the plan that runs it."""
        if self._layout is None:
            c = self.call
            self._layout = block_layout_module.block_layout(
                self.pattern,
                c.query_length,
                c.key_length,
                self.settings.block_size,
                c.query_offset,
            )
        return self._layout

    def sparse_pays_off(self, mode, max_fraction=MAX_COMPUTED_FRACTION):
        c = self.call
        decided = _block_sparse_decision(
            self.pattern,
            c.query_length,
            c.key_length,
            mode,
            self.settings.block_size,
            c.query_offset,
        )
        if decided is not None:
            return decided
        return self.layout().computed_fraction <= max_fraction

    def block_sparse_plan(self):
        c = self.call
        if _is_empty(c.query_length, c.key_length):
            # No block to compute: `attend` returns zeros without a layout.
            return Plan("block_sparse", self.components, c.query_offset)
        layout = self.layout()
        segment_layout = None
        if c.segments is not None:
            segs = c.segments
            segment_layout = block_layout_module.segment_layout(
                layout,
                segs.query_ids,
                segs.key_ids,
                # Cross attention: the keys are another stream the bound says nothing of.
                max_segment_length=self.settings.max_segment_length if segs.same_stream else None,
                aligned=segs.query_ids is segs.key_ids
                and _static_int(c.query_offset)
                and c.query_offset == 0,
            )
        kernel = None
        if segment_layout is None and self.machine.native_kernels and self.pallas_applies(layout):
            kernel = pallas.KERNEL
        return Plan(
            "block_sparse",
            self.components,
            c.query_offset,
            layout=layout,
            segment_layout=segment_layout,
            kernel=kernel,
        )

    def pallas_applies(self, layout):
        c = self.call
        return self.machine.pallas_block_sparse and pallas.applies(
            self.components, layout, c.head_dim, c.training, c.return_weights
        )

    def scale(self, softmax_only=False):
        c = self.call
        scale_of = self.components.softmax_scale if softmax_only else self.components.fused_scale
        # keras.ops.dot_product_attention needs one head size for keys and values (the
        # JAX backend checks it), so value_dim != head_dim rules out the fused path.
        return scale_of(
            c.head_dim,
            return_weights=c.return_weights or self.value_dim != c.head_dim,
            dropout_active=self.components.dropout_active(c.training),
        )

    def plan(self):
        c, s = self.call, self.settings
        scale = self.scale()
        cpu_fused = (
            s.block_sparse == "auto"
            and s.flash_attention is not True
            and self.machine.fused_kernel_is_dense
        )
        # Full and causal patterns run as Keras's own layer does (fused, or the whole
        # matrix on a CPU): no warning. A sparse pattern on whole matrices is quadratic.
        if (
            s.block_sparse == "auto"
            and self.pattern.kernel_form is None
            and not (_static_int(c.query_length) and _static_int(c.key_length))
        ):
            warn_unknown_lengths(s.name, self.pattern, c.query_length, c.key_length)
        native_plan = self.native_plan()
        if native_plan is not None:
            return native_plan
        if c.segments is not None and s.block_sparse == "auto" and (scale is None or cpu_fused):
            # Packed rows: the blocks whose segments never meet are skipped, so even a
            # full or causal pattern may pay off on the block-sparse path (where the ids
            # are concrete, or `max_segment_length` bounds them).
            packed = self.packed_plan_if_it_pays_off(
                MAX_COMPUTED_FRACTION if scale is None else MAX_FRACTION_OVER_FUSED
            )
            if packed is not None:
                return packed
        if scale is not None and s.block_sparse is not True:
            if cpu_fused and self.sparse_pays_off("auto", MAX_FRACTION_OVER_FUSED):
                return self.block_sparse_plan()
            return Plan(
                "fused",
                self.components,
                c.query_offset,
                scale=scale,
                flash_attention=s.flash_attention,
            )
        if self.sparse_pays_off(s.block_sparse):
            return self.block_sparse_plan()
        return Plan("dense", self.components, c.query_offset)

    def packed_plan_if_it_pays_off(self, max_fraction):
        """The block-sparse plan with segment ids where it computes at most `max_fraction`."""
        c = self.call
        if not self.static or _is_empty(c.query_length, c.key_length):
            return None
        nq = block_layout_module.num_blocks(c.query_length, self.settings.block_size)
        nk = block_layout_module.num_blocks(c.key_length, self.settings.block_size)
        if nq * nk < MIN_BLOCKS:
            return None
        candidate = self.block_sparse_plan()
        if candidate.segment_layout is not None and (
            candidate.segment_layout.computed_fraction <= max_fraction
        ):
            return candidate
        return None

    def native_plan(self):
        """The native path's plan if a backend kernel computes exactly this, else None."""
        c, s, machine = self.call, self.settings, self.machine
        scale = self.scale(softmax_only=True)
        if not machine.native_kernels or scale is None or s.block_sparse is True or not self.static:
            return None
        offset = c.query_offset
        if (
            s.flash_attention is not False
            and self.pattern.kernel_form is None  # full and causal: the fused path
            and (
                machine.flex_attention_is_fast
                # Forward only (a CPU): where no gradient is taken (inference), and on
                # inputs where skipping its blocks pays off (compiling costs seconds).
                or (
                    machine.flex_attention_forward
                    and not c.needs_grad
                    and block_sparse_pays_off(
                        self.pattern,
                        c.query_length,
                        c.key_length,
                        block_size=native.FLEX_BLOCK_SIZE,
                        query_offset=offset,
                    )
                )
            )
        ):
            return Plan(
                "native", self.components, offset, scale=scale, kernel="torch_flex_attention"
            )
        if (
            s.flash_attention is not False
            and not c.has_mask  # whole-key/query masks are expressible, but plan sees no shape
            and machine.splash(c.dtype)
        ):
            return Plan("native", self.components, offset, scale=scale, kernel="jax_splash")
        window = native.jax_window(self.pattern)
        if (
            window is None
            or window[1] != 0  # cuDNN takes a right window only with its causal mask
            or c.has_mask
            or offset != 0
            or c.query_length != c.key_length
            or not machine.cudnn_window(c.dtype)
        ):
            return None
        return Plan(
            "native", self.components, offset, scale=scale, kernel="jax_cudnn", window=window
        )


_warned_unknown_lengths = set()


def warn_unknown_lengths(name, pattern, query_length, key_length):
    """Warn, once per `name`, that a sparse pattern runs on whole score matrices."""
    if name in _warned_unknown_lengths:
        return
    _warned_unknown_lengths.add(name)
    warnings.warn(
        f"keras_attn layer {name!r}: its sparse pattern {pattern!r} runs on the dense "
        "path (the whole Tq x Tk score matrix: quadratic memory) because the query and "
        "key lengths are unknown where the function is traced (Received: "
        f"query_length={query_length}, key_length={key_length}), and the block-sparse "
        "path plans its blocks ahead of time. On TensorFlow, Keras retraces "
        "model.fit/predict/evaluate with a length of None once it sees a second input "
        "length. To keep the block-sparse cost, give the model inputs of a few fixed "
        "lengths (pad to buckets), a fixed-length keras.Input, or call it eagerly. "
        "(Shown once per layer.)",
        RuntimeWarning,
        stacklevel=3,
    )


def attend(
    plan, query, key, value, mask=None, *, segments=None, training=None, return_weights=False
):
    """Run a `Plan` on projected heads.

    Args:
        plan: What `plan` decided for these inputs.
        query: ``(B, Tq, H, D)``; key ``(B, Tk, H, D)``; value ``(B, Tk, H, Dv)``.
        mask: Bool data mask broadcastable to ``(B, H, Tq, Tk)`` (padding, explicit
            masks, cache validity), or None. The pattern is applied here.
        segments: The call's `keras_attn.segments.Segments`, or None: a segment mask
            on every path, or the plan's ``segment_layout`` on the block-sparse path.
        training: Whether dropout (and training-only noise) is active.
        return_weights: Whether to return the weights.

    Returns:
        ``(output (B, Tq, H, Dv), weights (B, H, Tq, Tk) or None)``.
    """
    offset = plan.query_offset
    if segments is not None and plan.segment_layout is None:
        mask = combine_masks(mask, segments.mask)  # (B, 1, Tq, Tk)
    elif segments is not None and segments.query_ids is not segments.key_ids:
        # The segment-aware layout never forms the segment mask, but a key whose
        # segment no query has (cross attention, cache slots) is masked for every query
        # and must have no influence (a NaN there stays out): mask it as padding. (The
        # (B, Tq, Tk) comparison is a transient; with a cache Tq is the few new tokens.)
        seen = ops.any(segments.mask, axis=2, keepdims=True)  # (B, 1, 1, Tk)
        mask = combine_masks(mask, seen)
    tq, tk = query.shape[1], key.shape[1]
    if _is_empty(tq, tk):
        # No query, or no key to attend to: zeros on every path (as a row with no
        # allowed key), without running a kernel on an empty axis.
        batch, heads = ops.shape(query)[0], query.shape[2]
        output = ops.zeros((batch, tq, heads, value.shape[-1]), dtype=value.dtype)
        weights = ops.zeros((batch, heads, tq, tk), dtype=value.dtype)
        return output, weights if return_weights else None
    query, key, value = kernels.drop_masked_positions(query, key, value, mask)

    def positions():
        # Made only where read, so that the fused path's graph is Keras's own.
        return make_positions(
            ops.shape(query)[1], ops.shape(key)[1], query.shape[2], query_offset=offset
        )

    if plan.path == "native":
        return _native(plan, query, key, value, mask), None
    if plan.path == "fused":
        pattern = plan.components.pattern
        causal = pattern.kernel_form == "causal"
        if causal and not (isinstance(offset, int) and offset == 0):
            # Absolute positions differ from the kernel's 0-based causal mask.
            mask = combine_masks(mask, pattern.mask(positions()))
            causal = False
        output = kernels.fused_attention(
            query,
            key,
            value,
            scale=plan.scale,
            causal=causal,
            mask=mask,
            flash_attention=plan.flash_attention,
        )
        return output, None
    q = ops.transpose(query, (0, 2, 1, 3))  # (B, H, Tq, D)
    k = ops.transpose(key, (0, 2, 1, 3))  # (B, H, Tk, D)
    v = ops.transpose(value, (0, 2, 1, 3))  # (B, H, Tk, Dv)
    if plan.path == "block_sparse" and plan.kernel == pallas.KERNEL:
        # Opt-in (KERAS_ATTN_PALLAS): the same layout on the Pallas kernel.
        output = pallas.block_sparse_attention(
            q, k, v, plan.layout, plan.components, mask=mask, query_offset=offset
        )
        weights = None
    elif plan.path == "block_sparse":
        layout = plan.layout if plan.segment_layout is None else plan.segment_layout
        output, weights = block_sparse_attention(
            q,
            k,
            v,
            layout,
            plan.components,
            positions(),
            mask,
            training=training,
            return_weights=return_weights,
            segments=segments,
        )
    else:
        output, weights = kernels.dense_attention(
            q, k, v, plan.components, positions(), mask, training, return_weights
        )
    output = ops.transpose(output, (0, 2, 1, 3))  # (B, Tq, H, Dv)
    return output, weights if return_weights else None


def _native(plan, query, key, value, mask):
    """Run the native kernel the plan names: ``(B, Tq, H, Dv)``."""
    offset = plan.query_offset
    if plan.kernel == "torch_flex_attention":
        return native.flex_attention(
            query,
            key,
            value,
            plan.components.pattern,
            scale=plan.scale,
            query_offset=offset,
            mask=mask,
        )
    if plan.kernel == "jax_splash":
        return native.splash_attention(
            query, key, value, plan.components.pattern, scale=plan.scale, query_offset=offset
        )
    return native.jax_local_attention(query, key, value, scale=plan.scale, window=plan.window)
