"""Context parallelism: one attention over a sequence sharded across devices (JAX).

Under an active `keras.distribution` whose device mesh has the sequence axis named
in a `ContextParallel`, `run` computes the attention core on projected heads
``(B, T, H, D)`` inside ``jax.shard_map`` over that axis: each device holds
``ceil(T / P)`` queries, keys and values (inputs and outputs sharded along T; a T
that is not a multiple of P is padded at the end inside the run, the padded keys
masked out and the padded queries dropped), and the keys and values reach the
other devices by one of three strategies, all exact:

- ``"ring"`` (Ring Attention, Liu et al. 2023): the K/V shards (with their key
  padding and segment ids; positions follow from the shard) pass around the ring
  of devices, both ways at once (``P / 2`` hops one way, ``P/2 - 1`` the other:
  ``P - 1`` ``ppermute`` steps in all); each step's partial softmax is merged into
  the running one by log-sum-exp (as flash attention merges blocks), so a device
  holds its own K/V shard and the two travelling ones, never all of them. Steps
  whose K/V shard the pattern's block mask leaves empty are skipped: statically
  where no device needs them (with the hops that would only carry shards to them),
  else per device (``lax.switch``). Where a contiguous layout would leave the work
  unbalanced (a causal pattern: the last device computes P blocks, the first one),
  the ring runs zig-zag (as ring-flash-attention's zigzag ring; Llama 3 cuts the
  sequence into 2·P chunks the same way): the sequence is cut into 2·P chunks and
  device d holds chunks d and 2P - 1 - d, reordered inside the run with two
  ``ppermute`` each way, so inputs and outputs stay in the caller's order; every
  device then computes the same number of blocks. Within a step the queries run
  in tiles of at most 512 rows (``lax.fori_loop``; a shorter chunk is one tile),
  each tile's partial softmax merged into its rows' running one, so a step holds
  ``(tile, key chunk)`` logits per head, not ``(shard, key chunk)``: memory linear
  in T. Softmax and ``sink_softmax`` only: their partial results merge. Its backward pass (a ``jax.custom_vjp``, as
  Ring Attention's and FlashAttention-2's) keeps only the inputs, the output and
  each query row's log-sum-exp, and runs the ring again: each step's weights are
  recomputed, and the keys' and values' gradients travel with their shard and go
  home in one more ``ppermute``, so a device holds one tile's block of weights at
  a time, not every step's. A score or score_mod with weights keeps JAX's autodiff
  of the ring (``plan.ring_backward``).
- ``"halo"``: for a banded pattern (`keras_attn.patterns.reach` gives
  ``(before, after)``, e.g. ``window - 1`` each side for `Local`) that reaches no
  further than one shard, each device receives only the last ``before`` keys of
  the previous device and the first ``after`` keys of the next (one ``ppermute``
  each way for keys and values, one more for their padding and segment ids; no
  ring), and attends its queries to them and its own keys in one block: every
  row it needs is whole, so any normalizer works.
- ``"all_gather"`` (Llama 3's context parallelism, Dubey et al. 2024): every
  device gathers all keys and values and attends its query shard to them at its
  absolute query positions, on the engine's own paths
  (`keras_attn.dispatch.plan`/`attend`): any pattern, normalizer or mask, and the
  weights when asked for.

``"auto"`` takes the halo where it applies (a banded pattern within one shard, self
attention, no weights asked for), else the ring where it applies (a softmax or
``sink_softmax`` normalizer, no weights asked for), else all_gather.

Only the JAX backend has ``keras.distribution`` complete; on TensorFlow and PyTorch
a layer with context parallelism raises a clear error when called.
"""

import dataclasses
import warnings
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_attn import dispatch
from keras_attn import kernels
from keras_attn import patterns as patterns_module
from keras_attn import segments as segments_module
from keras_attn.components import NEG_INF
from keras_attn.masks import combine_masks
from keras_attn.masks import pattern_mask_or_none
from keras_attn.normalizers import SinkSoftmax
from keras_attn.positions import Positions
from keras_attn.positions import make_positions

__all__ = ["STRATEGIES", "ContextParallel", "ContextParallelPlan", "mesh_for", "run"]

STRATEGIES = ("auto", "ring", "all_gather", "halo")


@keras.saving.register_keras_serializable(package="keras_attn")
@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """Context parallelism of an attention layer: its sequence sharded over a mesh axis.

    Pass it to a layer (``Attention(..., context_parallel=ContextParallel("seq"))``).
    While a `keras.distribution` whose device mesh has an axis named `axis` is active
    (JAX backend), the layer's attention core runs with queries, keys and values
    sharded along T over that axis (`keras_attn.context_parallel.run`); with no such
    distribution the layer runs on one device as usual.

    Args:
        axis: Name of the device mesh's sequence axis.
        strategy: ``"auto"`` (halo for banded patterns within one shard, else
            ring for softmax and ``sink_softmax``, else all_gather), ``"ring"``,
            ``"halo"`` or ``"all_gather"`` (see `keras_attn.context_parallel`).
        heads_axis: Name of the mesh axis the heads are sharded over
            (`keras_attn.layout_map`'s model axis), or None. Where the mesh has it,
            the attention core keeps the heads sharded over it too (each device
            attends its heads of its sequence shard: no gather of the heads), if the
            heads divide its size and no component depends on the head (see
            `run`); otherwise the heads are replicated across it.

    Raises:
        ValueError: an empty axis name, an unknown strategy, or a heads axis that
            is empty or the sequence axis.
    """

    axis: str = "seq"
    strategy: str = "auto"
    heads_axis: object = "model"

    def __post_init__(self):
        if not isinstance(self.axis, str) or not self.axis:
            raise ValueError(
                f"`axis` must be the name of a device mesh axis (a non-empty string). "
                f"Received: axis={self.axis!r}"
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"`strategy` must be one of {STRATEGIES}. Received: strategy={self.strategy!r}"
            )
        if self.heads_axis is not None and (
            not isinstance(self.heads_axis, str) or not self.heads_axis
        ):
            raise ValueError(
                "`heads_axis` must be None or the name of a device mesh axis (a non-empty "
                f"string). Received: heads_axis={self.heads_axis!r}"
            )
        if self.heads_axis == self.axis:
            raise ValueError(
                "`heads_axis` must differ from the sequence axis. Received: "
                f"axis={self.axis!r}, heads_axis={self.heads_axis!r}"
            )

    def get_config(self):
        return {"axis": self.axis, "strategy": self.strategy, "heads_axis": self.heads_axis}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @classmethod
    def get(cls, value):
        """A `ContextParallel` from None, an instance or its config dict (None stays None).

        Raises:
            TypeError: anything else.
        """
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            config = value.get("config", value) if "class_name" in value else value
            return cls.from_config(config)
        raise TypeError(
            "`context_parallel` must be None, a keras_attn.ContextParallel or its config "
            f"dict. Received: context_parallel={value!r} (of type {type(value).__name__})"
        )


class ContextParallelPlan(NamedTuple):
    """What `run` did: the path ``"context_parallel"`` and how (as `dispatch.Plan` reads).

    Attributes:
        path: ``"context_parallel"``.
        components: The `keras_attn.components.Components` of the call.
        strategy: ``"ring"``, ``"halo"`` or ``"all_gather"`` (what ``"auto"`` chose).
        axis: The mesh axis the sequence is sharded over.
        num_shards: P, the size of that axis.
        ring_steps: Ring: the steps s (device i computing with the K/V shard of
            device ``(i - s) mod P``; 0 is its own) that some device computes; the
            others were skipped for every device. None for all_gather.
        local: All_gather, and the halo of a pattern of ``query - key``: the
            `keras_attn.dispatch.Plan` each device ran on its query shard (e.g. the
            block-sparse path over the window); None otherwise.
        halo: Halo: ``(before, after)``, how many keys each device received from
            the previous and the next device (`keras_attn.patterns.reach`); else None.
        balance: Ring: whether the sequence was laid out zig-zag (device d holding
            chunks d and 2P - 1 - d of 2P) to balance a causal pattern's work.
        work: Ring: per device, the (query, key) pairs of the blocks it computed.
        ring_backward: Ring: ``"recompute"`` where its backward pass runs the ring
            again and recomputes each step's weights from the saved log-sum-exp
            (memory of one step, as flash attention), ``"autodiff"`` where JAX
            differentiates the ring and keeps every step's weights (a score or
            score_mod with weights: their gradients flow through autodiff); else None.
        ring_tile: Ring: how many query rows a device computes at once against a
            visiting K/V chunk (forward and backward): a step's logits are
            ``(tile, key chunk)``, not ``(shard, key chunk)``. None otherwise.
        heads_axis: The mesh axis the heads were sharded over inside the run, or
            None where they were replicated (no such axis, heads that do not divide
            it, or a component that depends on the head).
    """

    path: str
    components: object
    strategy: str
    axis: str
    num_shards: int
    ring_steps: object = None
    local: object = None
    query_offset: object = 0
    layout: object = None
    scale: object = None
    flash_attention: object = None
    kernel: object = None
    window: object = None
    segment_layout: object = None
    fallback_from: object = None
    halo: object = None
    balance: bool = False
    work: object = None
    ring_backward: object = None
    ring_tile: object = None
    heads_axis: object = None


_warned_missing_axis = set()


def mesh_for(config, name=None):
    """The JAX mesh to shard over for `config`, or None where the layer runs on one device.

    Args:
        config: A `ContextParallel`, or None.
        name: The layer's name, for the warning.

    Returns:
        The active distribution's ``jax.sharding.Mesh`` if it has ``config.axis``,
        else None (no config, no distribution, or a mesh without that axis: warned
        once per layer).

    Raises:
        RuntimeError: a backend other than JAX.
    """
    if config is None:
        return None
    backend = keras.backend.backend()
    if backend != "jax":
        raise RuntimeError(
            f"Context parallelism needs the JAX backend (keras.distribution is complete "
            f"only there). Received: context_parallel={config!r} on the {backend!r} "
            "backend. Set KERAS_BACKEND=jax, or build the layer with "
            "context_parallel=None (on one device; for data parallelism on "
            f"{backend!r}, use its own distribution strategy)."
        )
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    device_mesh = distribution.device_mesh
    if config.axis not in device_mesh.axis_names:
        if name not in _warned_missing_axis:
            _warned_missing_axis.add(name)
            warnings.warn(
                f"keras_attn layer {name!r}: context_parallel axis {config.axis!r} is not "
                f"an axis of the active distribution's mesh {tuple(device_mesh.axis_names)}"
                "; the attention runs without context parallelism. (Shown once per layer.)",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    return device_mesh.backend_mesh


def _mergeable(normalizer):
    """Whether partial results of this normalizer merge exactly by log-sum-exp."""
    if normalizer.is_softmax:
        return True
    cls = type(normalizer)
    return (
        isinstance(normalizer, SinkSoftmax)
        and cls.normalize is SinkSoftmax.normalize
        and cls.call is SinkSoftmax.call
    )


def _strategy(config, components, heads, num_shards, return_weights):
    """``(strategy, band)``: the strategy to run, and the halo's ``(before, after)`` or None."""
    strategy = config.strategy
    mergeable = _mergeable(components.normalizer)
    if strategy in ("auto", "halo"):
        band, why_not = _halo_band(components.pattern, heads, num_shards, return_weights)
        if band is not None:
            return "halo", band
        if strategy == "halo":
            raise ValueError(
                "Context parallelism with strategy='halo' exchanges only the keys a "
                "banded pattern reaches in the neighbouring shards, and here "
                f"{why_not}. Use strategy='ring' or 'all_gather' (or 'auto', which "
                f"takes the halo where it applies). Received: context_parallel={config!r}"
            )
        return ("ring" if mergeable and not return_weights else "all_gather"), None
    if strategy == "ring" and not mergeable:
        raise ValueError(
            "Context parallelism with strategy='ring' merges partial softmaxes, so it "
            "takes a softmax or sink_softmax normalizer only; other normalizers cannot "
            "be computed from partial results. Use strategy='all_gather' (or 'auto'). "
            f"Received: normalizer={type(components.normalizer).name!r}"
        )
    if strategy == "ring" and return_weights:
        raise ValueError(
            "Context parallelism with strategy='ring' never forms whole rows of "
            "weights, so it cannot return attention scores. Use strategy='all_gather' "
            "(or 'auto'), or return_attention_scores=False."
        )
    return strategy, None


def _halo_band(pattern, heads, num_shards, return_weights):
    """``(band, None)`` where the halo applies, else ``(None, why not)``."""
    band = patterns_module.reach(pattern)
    tq, tk = heads.query.shape[1], heads.key.shape[1]
    shard = -(-tk // num_shards)  # keys per device, the sequence padded to P shards
    offset = heads.query_offset
    if band is None:
        return None, (
            f"pattern={pattern!r} is not banded (keras_attn.patterns.reach gives no "
            "bound on how far it reaches)"
        )
    if tq != tk or not isinstance(offset, (int, np.integer)) or offset != 0:
        return None, (
            "queries and keys are not one sequence from position 0 (query_length="
            f"{tq}, key_length={tk}, query_offset={offset!r})"
        )
    if max(band) > shard:
        return None, (
            f"pattern={pattern!r} reaches {band} keys (before, after), more than one "
            f"shard of {shard} keys ({tk} keys over {num_shards} devices)"
        )
    if return_weights:
        return None, (
            "the attention scores were asked for (a device holds only its window's keys, "
            "not whole (B, H, Tq, Tk) rows)"
        )
    return band, None


def _check_call(heads, components, training, num_shards):
    if heads.segments is not None and heads.segments.reset_positions and components.score_mods:
        raise NotImplementedError(
            "Score_mods with positions restarted at each segment (reset_positions=True) "
            "are not implemented under context parallelism yet. Received: score_mods="
            f"{[type(m).name for m in components.score_mods]} with reset_positions=True."
        )
    if components.dropout_active(training):
        raise ValueError(
            "Dropout on the attention weights under context parallelism is not "
            "supported (each device would draw its own dropout mask). Set the layer's "
            f"dropout=0.0 or call it with training=False. Received: "
            f"dropout={components.dropout.rate}, training={training}"
        )
    if len(heads.query.shape) != 4:
        raise ValueError(
            "Context parallelism needs (B, T, dim) inputs (one sequence axis). "
            f"Received: heads of shape {tuple(heads.query.shape)}"
        )
    tq, tk = heads.query.shape[1], heads.key.shape[1]
    if tq is None or tk is None:
        raise ValueError(
            f"Context parallelism over {num_shards} devices needs query and key lengths "
            f"known when the layer is traced. Received: query_length={tq}, key_length={tk}"
        )


def _pad_to_shards(heads, num_shards, tile=1):
    """`heads` with Tq and Tk padded at the end to multiples of `num_shards`.

    With a `tile` (the ring's query tile), Tq is padded to a multiple of
    ``num_shards * tile``, and Tk too where it equals Tq (self attention keeps
    queries and keys in equal chunks, which the ring's block skipping needs).

    The padded keys are masked out by position (each strategy knows the true key
    length); the padded queries see no key and are dropped by `run`. A data mask is
    padded with False, segment ids and starts with their last value (a segment stays
    contiguous).
    """
    tq, tk = heads.query.shape[1], heads.key.shape[1]
    pad_q, pad_k = -tq % (num_shards * tile), -tk % num_shards
    if tq == tk:
        pad_k = pad_q
    if not pad_q and not pad_k:
        return heads

    def pad(x, axis, amount, mode="constant"):
        if x is None or not amount:
            return x
        widths = [(0, 0)] * len(x.shape)
        widths[axis] = (0, amount)
        return ops.pad(x, widths, mode=mode)

    segments = heads.segments
    if segments is not None:
        segments = segments._replace(
            query_ids=pad(segments.query_ids, 1, pad_q, "edge"),
            key_ids=pad(segments.key_ids, 1, pad_k, "edge"),
            query_starts=pad(segments.query_starts, 1, pad_q, "edge"),
            key_starts=pad(segments.key_starts, 1, pad_k, "edge"),
        )
    mask = heads.mask
    if mask is not None:
        # (B|1, H|1, Tq|1, Tk|1): an axis of 1 broadcasts and stays 1.
        mask = pad(mask, 2, pad_q if mask.shape[2] != 1 else 0)
        mask = pad(mask, 3, pad_k if mask.shape[3] != 1 else 0)
    return heads._replace(
        query=pad(heads.query, 1, pad_q),
        key=pad(heads.key, 1, pad_k),
        value=pad(heads.value, 1, pad_k),
        mask=mask,
        segments=segments,
    )


def check_no_cache(config, name=None):
    """Raise if `config` shards the sequence now (a KV cache cannot be sharded along T).

    Raises:
        ValueError: a cache with context parallelism active.
    """
    if mesh_for(config, name) is not None:
        raise ValueError(
            "A KV cache cannot be used under context parallelism: decoding appends one "
            "token at a time and the cache would have to be sharded along its length. "
            f"Received: a `cache` with context_parallel={config!r} while the active "
            "distribution's mesh has that axis. Decode outside the distribution (or "
            "with a layer built with context_parallel=None)."
        )


def run(
    components, heads, config, settings=None, *, mesh=None, training=None, return_weights=False
):
    """Run one attention with its sequence sharded over ``config.axis`` of `mesh`.

    Args:
        components: `keras_attn.components.Components` (the call's pattern).
        heads: `keras_attn.dispatch.Heads` of ``(B, T, dim)`` inputs, without a cache:
            query ``(B, Tq, H, D)``, key ``(B, Tk, H, D)``, value ``(B, Tk, H, Dv)``,
            a bool mask broadcastable to ``(B, H, Tq, Tk)`` or None.
        config: The `ContextParallel`.
        settings: The layer's `keras_attn.dispatch.Settings` (all_gather's local plans).
        mesh: The ``jax.sharding.Mesh`` (default: `mesh_for(config)`).
        training: Whether training-only behaviour is active.
        return_weights: Whether to return the weights (all_gather only).

    Returns:
        ``(output (B, Tq, H, Dv), weights (B, H, Tq, Tk) or None, ContextParallelPlan)``.
        Tq and Tk need not be multiples of the axis size P: they are padded to
        multiples inside (the padded keys masked out, the padded queries dropped).

    Raises:
        RuntimeError: a backend other than JAX.
        ValueError: lengths unknown when traced; a ring with a normalizer other than
            softmax/sink_softmax or with weights asked for; a halo with a pattern
            that is not banded (`keras_attn.patterns.reach`), that reaches further
            than one shard, with cross attention or a query offset, or with weights
            asked for; active dropout; no distribution with that axis.
        NotImplementedError: score_mods with ``reset_positions``.

    The heads stay sharded over ``config.heads_axis`` inside the run where the mesh
    has that axis (other than the batch axis, of size > 1), the query and key heads
    are multiples of its size, and nothing depends on the head: no score_mods, a
    built-in score and pattern, a softmax normalizer or (on the ring)
    ``sink_softmax``, whose per-head sinks each device slices. Otherwise they are
    replicated over it (``plan.heads_axis`` is None).
    """
    mesh = mesh_for(config) if mesh is None else mesh
    if mesh is None:
        raise ValueError(
            f"Context parallelism over axis {config.axis!r} needs an active "
            "keras.distribution whose device mesh has that axis. Received: "
            f"distribution={keras.distribution.distribution()!r}"
        )
    num_shards = mesh.shape[config.axis]
    _check_call(heads, components, training, num_shards)
    strategy, band = _strategy(config, components, heads, num_shards, return_weights)
    query_length, key_length = heads.query.shape[1], heads.key.shape[1]
    chunks = tile = 1
    weights = local = layout = recompute = None
    if strategy == "ring":
        chunks = _ring_chunks(components.pattern, heads, num_shards)
        recompute = _recomputes(components)
        # JAX's autodiff of the ring keeps every step's weights anyway: no tiles.
        tile = _query_tile(query_length, num_shards * chunks, _RING_TILE if recompute else None)
    padded = _pad_to_shards(heads, num_shards * chunks, tile)
    heads_axis = _heads_axis(config, mesh, components, heads, strategy)
    sharding = _Sharding(mesh, config.axis, padded, query_length, key_length, heads_axis)
    if strategy == "ring":
        layout = _ring_layout(
            components.pattern,
            (padded.query.shape[1], padded.key.shape[1]),
            (query_length, key_length),
            num_shards,
            chunks,
            heads.query_offset,
            tile,
        )
        output = _ring(components, sharding, layout, recompute)
    elif strategy == "halo":
        output, local = _halo(components, sharding, band, settings, training)
    else:
        output, weights, local = _all_gather(
            components, sharding, settings, training, return_weights
        )
    output = output[:, :query_length]  # (B, Tq, H, Dv): the padded queries dropped
    if weights is not None:
        weights = weights[:, :, :query_length, :key_length]  # (B, H, Tq, Tk)
    plan = ContextParallelPlan(
        "context_parallel",
        components,
        strategy,
        config.axis,
        num_shards,
        local=local,
        query_offset=heads.query_offset,
        halo=band,
        ring_steps=None if layout is None else layout.steps,
        balance=layout is not None and layout.chunks == 2,
        work=None if layout is None else layout.work,
        ring_backward=None if recompute is None else ("recompute" if recompute else "autodiff"),
        ring_tile=None if layout is None else layout.tile,
        heads_axis=heads_axis,
    )
    return output, weights, plan


def _builtin_pattern(pattern):
    if isinstance(pattern, (patterns_module.Union, patterns_module.Intersection)):
        return all(_builtin_pattern(p) for p in pattern.patterns)
    return type(pattern).__module__ == patterns_module.__name__


def _heads_axis(config, mesh, components, heads, strategy):
    """The mesh axis to shard the heads over inside the run, or None (replicated)."""
    axis = config.heads_axis
    if axis is None or axis not in mesh.shape or mesh.shape[axis] == 1:
        return None
    if axis == getattr(keras.distribution.distribution(), "batch_dim_name", None):
        return None
    size = mesh.shape[axis]
    if any(x.shape[2] % size for x in (heads.query, heads.key, heads.value)):
        return None
    normalizer = components.normalizer
    if not (normalizer.is_softmax or (strategy == "ring" and _mergeable(normalizer))):
        return None
    if components.score_mods or type(components.score).__module__ != "keras_attn.scores":
        return None
    if not _builtin_pattern(components.pattern):
        return None
    mask = heads.mask
    if mask is not None and len(mask.shape) == 4 and mask.shape[1] not in (1, heads.query.shape[2]):
        return None
    return axis


class _Sharding:
    """How the call's tensors are laid out over the mesh inside ``shard_map``.

    T is sharded over the sequence axis; the batch over the distribution's batch
    axis where the mesh has one (and it divides B); other axes replicate. A data
    mask ``(B|1, H|1, Tq|1, Tk|1)`` has its query axis sharded like the queries; a
    key mask (query axis 1) has its key axis sharded like the keys and travels with
    them; a mask with both axes keeps its key axis whole on every device. `heads`
    are padded to P shards (`_pad_to_shards`); `query_length` and `key_length` are
    the lengths before the padding. With a `heads_axis`, the heads (and a per-head
    mask's heads) are sharded over it.
    """

    def __init__(self, mesh, axis, heads, query_length, key_length, heads_axis=None):
        from jax.sharding import PartitionSpec

        self.heads = heads  # padded to P shards
        self.query_length = query_length  # before the padding
        self.key_length = key_length
        self.mesh = mesh
        self.axis = axis
        self.num_shards = mesh.shape[axis]
        self.batch = None
        distribution = keras.distribution.distribution()
        batch_axis = getattr(distribution, "batch_dim_name", None)
        batch_size = heads.query.shape[0]
        if (
            batch_axis in mesh.shape
            and batch_axis != axis
            and batch_size is not None
            and batch_size % mesh.shape[batch_axis] == 0
        ):
            self.batch = batch_axis
        self.heads_axis = heads_axis
        self.heads_spec = PartitionSpec(self.batch, axis, heads_axis, None)  # (B, T, H, D)
        self.replicated = PartitionSpec()
        mask = heads.mask
        self.mask_rows = self.mask_keys = False
        self.mask_spec = None
        if mask is not None:
            rank = len(mask.shape)
            if rank < 4:
                mask = ops.reshape(mask, (1,) * (4 - rank) + tuple(mask.shape))
            self.mask = mask
            _, _, rows, keys = mask.shape
            self.mask_rows = rows != 1
            self.mask_keys = keys != 1 and not self.mask_rows  # travels with the keys
            batch = self.batch if mask.shape[0] != 1 else None
            mask_heads = heads_axis if mask.shape[1] != 1 else None
            self.mask_spec = PartitionSpec(
                batch,
                mask_heads,
                axis if self.mask_rows else None,
                axis if self.mask_keys else None,
            )
        ids_spec = PartitionSpec(self.batch, axis)  # (B, T)
        self.arguments = {
            "query": (heads.query, self.heads_spec),
            "key": (heads.key, self.heads_spec),
            "value": (heads.value, self.heads_spec),
            "offset": (_offset_arg(heads.query_offset), self.replicated),
        }
        if mask is not None:
            self.arguments["mask"] = (mask, self.mask_spec)
        if heads.segments is not None:
            self.same_stream = heads.segments.same_stream
            self.arguments["query_ids"] = (heads.segments.query_ids, ids_spec)
            self.arguments["key_ids"] = (heads.segments.key_ids, ids_spec)

    def map(self, body, out_specs):
        """``body(local)`` under ``shard_map``; `local` maps argument names to shards."""
        import jax

        names = list(self.arguments)

        def positional(*shards):
            return body(dict(zip(names, shards, strict=True)))

        # check_vma=False: the ring's per-device `lax.cond` must not hold the psum that
        # the gradient of a replicated weight (a score's, a score_mod's) would get in it.
        mapped = jax.shard_map(
            positional,
            mesh=self.mesh,
            out_specs=out_specs,
            check_vma=False,
            in_specs=tuple(self.arguments[n][1] for n in names),
        )
        return mapped(*(self.arguments[n][0] for n in names))


def _offset_arg(query_offset):
    return ops.cast(ops.convert_to_tensor(query_offset), "int32")


# -- all_gather -------------------------------------------------------------------


def _all_gather(components, sharding, settings, training, return_weights):
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec

    axis = sharding.axis
    local_plans = []

    def gather(x, along):
        return jax.lax.all_gather(x, axis, axis=along, tiled=True)

    def body(local):
        q, mask = local["query"], local.get("mask")
        k = gather(local["key"], 1)  # (B, Tk, H, D)
        v = gather(local["value"], 1)  # (B, Tk, H, Dv)
        if sharding.mask_keys:
            mask = gather(mask, 3)  # (B|1, H|1, 1, Tk)
        if k.shape[1] != sharding.key_length:  # the keys padded to P shards
            valid = jnp.arange(k.shape[1]) < sharding.key_length
            mask = combine_masks(mask, valid.reshape(1, 1, 1, -1))
        segs = None
        if "query_ids" in local:
            segs = segments_module.Segments(
                local["query_ids"], gather(local["key_ids"], 1), same_stream=sharding.same_stream
            )
        tq = q.shape[1]
        query_offset = local["offset"] + jax.lax.axis_index(axis).astype("int32") * tq
        local_heads = dispatch.Heads(q, k, v, mask, segs, query_offset)
        output, weights, plan = dispatch.run(
            components, local_heads, settings, training=training, return_weights=return_weights
        )
        local_plans.append(plan)
        return (output, weights) if return_weights else output

    weights_spec = PartitionSpec(sharding.batch, sharding.heads_axis, axis, None)  # (B, H, Tq, Tk)
    out_specs = (sharding.heads_spec, weights_spec) if return_weights else sharding.heads_spec
    result = sharding.map(body, out_specs)
    output, weights = result if return_weights else (result, None)
    return output, weights, local_plans[-1] if local_plans else None


# -- ring -------------------------------------------------------------------------


class _RingLayout(NamedTuple):
    """Which chunks of the sequence each device holds, and which blocks it computes.

    The sequence (padded to ``P * chunks`` chunks) is cut into ``P * chunks`` chunks.
    With one chunk per device, device d holds chunk d; with two (zig-zag, as in
    ring-flash-attention's zigzag ring and Llama 3's 2·P chunks), device d holds
    chunks d and ``2P - 1 - d``, so that under a causal pattern each device has one
    early and one late chunk and every device computes as many blocks as the others.

    Attributes:
        chunks: Chunks per device, 1 or 2.
        needed: Bool numpy ``(P, P, chunks, chunks)``: at ring step s, whether device
            d computes its query chunk a against key chunk b of the K/V shard of
            device ``(d - s) mod P``.
        steps: The ring steps some device computes (the others are skipped).
        work: Per device, the (query, key) pairs of the blocks it computes.
        tile: Query rows computed at once (`_query_tile`); it divides a query chunk.
    """

    chunks: int
    needed: object
    steps: tuple
    work: tuple
    tile: int = 1


def _held(device, num_shards, chunks):
    """The chunks a device holds, in its local order."""
    return (device,) if chunks == 1 else (device, 2 * num_shards - 1 - device)


def _chunk_table(pattern, lengths, true_lengths, count, query_offset):
    """Bool numpy ``(count, count)``: whether query chunk i may see any key of key chunk j.

    The padded ``(Tq, Tk)`` are cut into `count` chunks each; chunks holding only
    padding (past the true lengths) see nothing. All True where it cannot be worked
    out ahead of time (an offset known only at run time, chunks of different sizes).
    """
    query_chunk, key_chunk = lengths[0] // count, lengths[1] // count
    table = np.ones((count, count), bool)
    if (
        pattern.kernel_form != "full"
        and query_chunk == key_chunk
        and isinstance(query_offset, (int, np.integer))
    ):
        table = np.asarray(pattern.block_mask(*lengths, query_chunk, int(query_offset)), bool)
    first = np.arange(count)
    return (
        table
        & (first * query_chunk < true_lengths[0])[:, None]
        & (first * key_chunk < true_lengths[1])[None, :]
    )


def _ring_layout(pattern, lengths, true_lengths, num_shards, chunks, query_offset, tile=1):
    """The `_RingLayout` of `chunks` per device for padded and true ``(Tq, Tk)``."""
    count = num_shards * chunks
    table = _chunk_table(pattern, lengths, true_lengths, count, query_offset)
    needed = np.zeros((num_shards, num_shards, chunks, chunks), bool)
    for step in range(num_shards):
        for device in range(num_shards):
            rows = _held(device, num_shards, chunks)
            columns = _held((device - step) % num_shards, num_shards, chunks)
            needed[step, device] = table[np.ix_(rows, columns)]
    steps = tuple(s for s in range(num_shards) if needed[s].any())
    area = (lengths[0] // count) * (lengths[1] // count)
    work = tuple(int(n) * area for n in needed.sum(axis=(0, 2, 3)))
    return _RingLayout(chunks, needed, steps, work, tile)


# The most query rows a ring step computes at once against a visiting K/V chunk: its
# logits (and, in the backward pass, their gradients) are (tile, key chunk) per head.
# A module constant so the tests can force small tiles on short sequences.
_RING_TILE = 512


def _query_tile(query_length, count, limit):
    """Query rows per tile for `query_length` queries cut into `count` chunks.

    A chunk of at most `limit` rows is one tile (short sequences run as before); a
    longer one is cut into ``ceil(chunk / limit)`` equal tiles, the chunk padded by
    fewer rows than there are tiles. No `limit` (None): one tile per chunk.
    """
    chunk = -(-query_length // count)
    if limit is None:
        return chunk
    tiles = -(-chunk // limit)
    return -(-chunk // tiles)


def _ring_chunks(pattern, heads, num_shards):
    """2 (zig-zag) where it takes a quarter or more off the busiest device's work, else 1.

    Both layouts are counted in chunks of ``T / 2P``: contiguously device d holds
    chunks 2d and 2d + 1, zig-zag d and 2P - 1 - d. Only for self attention from
    position 0 (queries and keys in one order); a causal pattern gains (the last
    device would otherwise compute about twice the average), a window or a full
    pattern does not.
    """
    tq, tk = heads.query.shape[1], heads.key.shape[1]
    offset = heads.query_offset
    if num_shards < 2 or tq != tk or not isinstance(offset, (int, np.integer)) or offset:
        return 1
    padded = (-(-tq // (2 * num_shards)) * 2 * num_shards,) * 2
    table = _chunk_table(pattern, padded, (tq, tk), 2 * num_shards, 0)
    per_chunk = table.sum(axis=1)
    devices = np.arange(num_shards)
    contiguous = per_chunk[2 * devices] + per_chunk[2 * devices + 1]
    zigzag = per_chunk[devices] + per_chunk[2 * num_shards - 1 - devices]
    return 2 if 4 * zigzag.max() <= 3 * contiguous.max() else 1


def _ring(components, sharding, layout, recompute):
    """The ring on `sharding`'s heads, laid out as `layout` (a `_RingLayout`).

    With `recompute`, the attention of each device is a ``jax.custom_vjp`` whose
    forward keeps only its inputs, its output and each query row's log-sum-exp,
    and whose backward runs the ring a second time, recomputing each step's
    weights (`_ring_backward`); otherwise JAX differentiates the ring itself and
    keeps every step's weights for the backward pass.
    """
    import jax
    import jax.numpy as jnp

    axis, num_shards, heads = sharding.axis, sharding.num_shards, sharding.heads
    chunks = layout.chunks
    sink = _sink_logits(components.normalizer, heads.query.shape[2])
    walk = _RingWalk(components, sharding, layout, unrolled=not recompute)

    def forward(q, k, v, sink, data):
        index = jax.lax.axis_index(axis).astype("int32")
        qh = jnp.transpose(q, (0, 2, 1, 3))  # (B, H, Tq / P, D)
        batch, num_heads, length = qh.shape[0], qh.shape[1], qh.shape[2]
        state = (
            jnp.full((batch, num_heads, length, 1), NEG_INF, "float32"),  # running max
            jnp.zeros((batch, num_heads, length, 1), "float32"),  # running sum
            jnp.zeros((batch, num_heads, length, v.shape[-1]), "float32"),  # running output
        )
        blocks = walk.blocks(index, data)

        def merge(state, rows, columns, travelling, source, accumulated):
            block = blocks(rows, columns, travelling, source)
            kh = jnp.transpose(travelling[0][:, block.columns], (0, 2, 1, 3))  # (B, H, c, D)
            vh = jnp.transpose(travelling[1][:, block.columns], (0, 2, 1, 3))  # (B, H, c, Dv)

            def tile(start, state):
                query_positions, block_mask = block.tile(start)
                merged = _merge_block(
                    components,
                    tuple(_rows(x, start, walk.tile) for x in state),
                    _rows(qh, start, walk.tile),
                    kh,
                    vh,
                    query_positions,
                    block.key_positions,
                    block_mask,
                )
                return tuple(
                    jax.lax.dynamic_update_slice_in_dim(x, m, start, axis=2)
                    for x, m in zip(state, merged, strict=True)
                )

            return walk.tiles(block.rows, tile, state), accumulated

        state, _ = walk.run(index, state, _travelling(sharding, k, v, data), merge)
        return state

    def attend(q, k, v, sink, data):
        return _finish(forward(q, k, v, sink, data), sink)  # (B, H, Tq / P, Dv)

    def attend_forward(q, k, v, sink, data):
        state = forward(q, k, v, sink, data)
        output = _finish(state, sink)
        return output, (q, k, v, sink, data, output, _log_sum_exp(state, sink))

    def attend_backward(residuals, output_gradient):
        q, k, v, sink, data = residuals[:5]
        gradients = _ring_backward(components, sharding, walk, residuals, output_gradient)
        dq, dk, dv, dsink = gradients
        nothing = jax.tree_util.tree_map(lambda _: None, data)
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dsink, nothing)

    if recompute:
        attend = jax.custom_vjp(attend)
        attend.defvjp(attend_forward, attend_backward)

    def body(local):
        index = jax.lax.axis_index(axis).astype("int32")
        if chunks == 2:
            local = _to_zigzag(local, sharding, index)
        data = {name: local[name] for name in ("mask", "query_ids", "key_ids") if name in local}
        data["offset"] = local["offset"]
        local_sink = sink
        if sink is not None and sharding.heads_axis is not None and sink.shape[1] > 1:
            count = local["query"].shape[2]  # this device's heads
            first = jax.lax.axis_index(sharding.heads_axis).astype("int32") * count
            local_sink = jax.lax.dynamic_slice_in_dim(sink, first, count, axis=1)
        output = attend(local["query"], local["key"], local["value"], local_sink, data)
        output = jnp.transpose(output, (0, 2, 1, 3)).astype(local["value"].dtype)  # (B, n, H, Dv)
        return _from_zigzag(output, axis, num_shards, index) if chunks == 2 else output

    return sharding.map(body, sharding.heads_spec)


# Private switch: True makes every ring's backward JAX's autodiff of the forward (each
# step's weights kept), as before the recomputing backward; the tests compare the two.
_AUTODIFF_RING = False


def _recomputes(components):
    """Whether the ring's backward can recompute its steps (`_ring_backward`).

    Not where the score or a score_mod has weights: the custom backward returns the
    gradients of the queries, keys, values and sinks only.
    """
    if _AUTODIFF_RING:
        return False
    return not any(part.weights for part in (components.score, *components.score_mods))


def _travelling(sharding, k, v, data):
    """What travels round the ring: keys, values, their padding and their segment ids."""
    return (k, v, data.get("mask") if sharding.mask_keys else None, data.get("key_ids"))


class _Block(NamedTuple):
    """Query chunks against key chunks at one ring step (`_RingWalk.blocks`)."""

    rows: slice  # of the local queries
    columns: slice  # of the travelling keys
    key_positions: object  # (columns,)
    tile: object  # start -> (query positions (tile,), data mask (B|1, H|1, tile|1, columns))


def _rows(x, start, size):
    """Rows ``[start, start + size)`` of ``(B, H, rows, ...)`` (`start` may be traced)."""
    import jax

    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=2)


class _RingWalk:
    """The ring's steps, in the order they run, shared by its forward and backward pass.

    `run` sends the travelling K/V shard round the ring both ways and calls a
    function on each step some device computes (the others skipped; devices that
    compute different blocks at one step go through ``lax.switch``). Gradients
    accumulated for a K/V shard travel with it and, at the end of each direction,
    go back to its device in one more ``ppermute``.
    """

    def __init__(self, components, sharding, layout, unrolled=False):
        self.sharding, self.layout = sharding, layout
        self.num_shards = num_shards = sharding.num_shards
        half = num_shards // 2
        self.forward = [s for s in layout.steps if 0 < s <= half]
        self.backward = [num_shards - s for s in layout.steps if s > half]  # hops, nearest first
        self.components = components
        self.tile = layout.tile
        self.unrolled = unrolled

    def _hop(self, tree, shift):
        import jax

        pairs = [(j, (j + shift) % self.num_shards) for j in range(self.num_shards)]
        return jax.tree_util.tree_map(
            lambda x: jax.lax.ppermute(x, self.sharding.axis, pairs), tree
        )

    def tiles(self, rows, function, carry):
        """``function(start, carry)`` on each query tile of the local rows `rows` (a slice).

        One tile runs inline; more run in a ``lax.fori_loop``, so a step holds one
        tile's logits at a time. Under JAX's autodiff of the ring (`unrolled`: each
        chunk is one tile) the tiles run inline: autodiff of a loop whose body
        closes over weights laid out on the mesh fails inside ``shard_map``.
        """
        import jax

        count = (rows.stop - rows.start) // self.tile
        if count == 1 or self.unrolled:
            for start in range(rows.start, rows.stop, self.tile):
                carry = function(start, carry)
            return carry
        return jax.lax.fori_loop(
            0, count, lambda i, carry: function(rows.start + i * self.tile, carry), carry
        )

    def blocks(self, index, data):
        """``blocks(rows, columns, travelling, source)``: where and how a block is masked.

        Returns a `_Block` of query chunks `rows` against key chunks `columns` of
        the K/V shard of device `source`: its slices of the local queries and of the
        travelling keys, the keys' positions, and ``tile(start)``, the positions and
        data mask of the query tile starting at local row `start`.
        """
        import jax
        import jax.numpy as jnp

        sharding, chunks, num_shards = self.sharding, self.layout.chunks, self.num_shards
        mask, query_ids = data.get("mask"), data.get("query_ids")
        padded = sharding.heads.key.shape[1] != sharding.key_length
        length = sharding.heads.query.shape[1] // num_shards
        cq = length // chunks
        ck = sharding.heads.key.shape[1] // num_shards // chunks
        query_positions = data["offset"] + jnp.concatenate(
            [held * cq + jnp.arange(cq, dtype="int32") for held in _held(index, num_shards, chunks)]
        )

        size = self.tile

        def block(rows, columns, travelling, source):
            _, _, key_mask, key_ids = travelling
            r = slice(rows[0] * cq, (rows[-1] + 1) * cq)  # chunks in a row: contiguous
            c = slice(columns[0] * ck, (columns[-1] + 1) * ck)
            held = _held(source, num_shards, chunks)
            starts = [held[b] * ck for b in columns]
            key_positions = jnp.concatenate([s + jnp.arange(ck, dtype="int32") for s in starts])
            block_key_mask = None if key_mask is None else key_mask[..., c]
            block_key_ids = None if key_ids is None else key_ids[:, c]

            def tile(start):
                rows_mask = _rows(mask, start, size) if sharding.mask_rows else mask
                block_mask = _block_data_mask(sharding, rows_mask, block_key_mask, starts, ck)
                if query_ids is not None:
                    tile_ids = jax.lax.dynamic_slice_in_dim(query_ids, start, size, axis=1)
                    same = segments_module.segment_mask(tile_ids, block_key_ids)
                    block_mask = combine_masks(block_mask, same)  # (B, 1|H, tile, columns)
                if padded:
                    valid = key_positions < sharding.key_length
                    block_mask = combine_masks(block_mask, valid.reshape(1, 1, 1, -1))
                tile_positions = jax.lax.dynamic_slice_in_dim(query_positions, start, size)
                return tile_positions, block_mask

            return _Block(r, c, key_positions, tile)

        return block

    def _step(self, index, carry, step, travelling, accumulated, compute):
        import jax
        import jax.numpy as jnp

        needed, num_shards, chunks = self.layout.needed, self.num_shards, self.layout.chunks
        source = (index - step) % num_shards
        kinds = sorted({needed[step, d].tobytes() for d in range(num_shards)})
        branch_of = [kinds.index(needed[step, d].tobytes()) for d in range(num_shards)]

        def branch(blocks):
            def run(operands):
                carry, accumulated = operands
                for rows, columns in _rectangles(blocks):
                    carry, accumulated = compute(
                        carry, rows, columns, travelling, source, accumulated
                    )
                return carry, accumulated

            return run

        blocks = [np.frombuffer(kind, bool).reshape(chunks, chunks) for kind in kinds]
        if len(blocks) == 1:
            return branch(blocks[0])((carry, accumulated))
        index_of = jnp.asarray(branch_of, "int32")[index]
        return jax.lax.switch(index_of, [branch(b) for b in blocks], (carry, accumulated))

    def run(self, index, carry, own, compute, zeros=None):
        """Call ``compute(carry, rows, columns, travelling, source, accumulated)`` on each block.

        `zeros`: None, or the gradients' accumulators for one K/V shard (zeros); they
        travel with the shard and come back to its device.

        Returns:
            ``(carry, accumulated)``: the accumulators of this device's own K/V
            shard (summed over every device that used it), or None.
        """
        home = zeros
        if 0 in self.layout.steps:
            carry, home = self._step(index, carry, 0, own, home, compute)
        for direction, wanted in ((1, self.forward), (-1, self.backward)):
            travelling, accumulated = own, zeros
            for hop in range(1, max(wanted, default=0) + 1):
                travelling = self._hop(travelling, direction)
                if accumulated is not None and hop > min(wanted):
                    accumulated = self._hop(accumulated, direction)  # with its shard
                if hop in wanted:
                    step = hop if direction == 1 else self.num_shards - hop
                    carry, accumulated = self._step(
                        index, carry, step, travelling, accumulated, compute
                    )
            if zeros is not None and wanted:
                back = self._hop(accumulated, -direction * max(wanted))  # home
                home = tuple(h + b for h, b in zip(home, back, strict=True))
        return carry, home


def _log_sum_exp(state, sink):
    """Each query row's log-sum-exp ``(B, H, Tq, 1)`` over its keys (and the sink).

    0 for a row with no allowed key and no sink (its weights are all 0).
    """
    import jax.numpy as jnp

    running_max, running_sum, _ = state
    if sink is None:
        has_key = running_sum > 0
        return jnp.where(has_key, running_max + jnp.log(jnp.where(has_key, running_sum, 1.0)), 0.0)
    top = jnp.maximum(running_max, sink)
    return top + jnp.log(running_sum * jnp.exp(running_max - top) + jnp.exp(sink - top))


def _ring_backward(components, sharding, walk, residuals, output_gradient):
    """The ring's gradients from its inputs, output and log-sum-exp (a second ring pass).

    At each step a device recomputes its block's logits ``s`` from its queries and
    the visiting keys, ``p = exp(s - lse)``, and with ``delta = rowsum(dO * O)``:
    ``dV += pᵀ·dO``, ``dS = p * (dO·Vᵀ - delta)``, and ``dQ``, ``dK`` from ``dS``
    through the score and score_mods (their vjp: the softmax scale included).
    ``dK``, ``dV`` travel with their K/V shard and return to its device.

    Returns:
        ``(dq (B, n, H, D), dk, dv (B, n, H, Dv), dsink or None)``, float32.
    """
    import jax
    import jax.numpy as jnp

    q, k, v, sink, data, output, lse = residuals
    index = jax.lax.axis_index(sharding.axis).astype("int32")
    qh = jnp.transpose(q, (0, 2, 1, 3))  # (B, H, n, D)
    do = output_gradient.astype("float32")  # (B, H, n, Dv)
    delta = jnp.sum(do * output, axis=-1, keepdims=True)  # (B, H, n, 1)
    blocks = walk.blocks(index, data)

    def gradients(dq, rows, columns, travelling, source, accumulated):
        block = blocks(rows, columns, travelling, source)
        c, key_positions, size = block.columns, block.key_positions, walk.tile
        kh = jnp.transpose(travelling[0][:, c], (0, 2, 1, 3))  # (B, H, columns, D)
        vh = jnp.transpose(travelling[1][:, c], (0, 2, 1, 3)).astype("float32")

        def tile(start, carry):
            dq, dk, dv = carry  # dk, dv: of this block's key chunks
            query_positions, block_mask = block.tile(start)

            def logits_of(query, key):
                return _block_logits(components, query, key, query_positions, key_positions)

            x, pullback = jax.vjp(logits_of, _rows(qh, start, size), kh)  # (B, H, tile, c)
            positions = _block_positions(query_positions, key_positions, qh.shape[1])
            mask = combine_masks(pattern_mask_or_none(components.pattern, positions), block_mask)
            if mask is not None:
                x = jnp.where(mask, x, NEG_INF)
            p = jnp.exp(x - _rows(lse, start, size))
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            do_r = _rows(do, start, size)
            dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p, do_r)
            ds = p * (jnp.einsum("bhqd,bhkd->bhqk", do_r, vh) - _rows(delta, start, size))
            dq_block, dk_block = pullback(ds)
            dq_rows = _rows(dq, start, size) + dq_block.astype("float32")
            dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_rows, start, axis=2)
            return dq, dk + dk_block.astype("float32"), dv

        dk, dv = accumulated
        zeros = (jnp.zeros_like(dk[:, :, c]), jnp.zeros_like(dv[:, :, c]))
        dq, dk_block, dv_block = walk.tiles(block.rows, tile, (dq, *zeros))
        return dq, (dk.at[:, :, c].add(dk_block), dv.at[:, :, c].add(dv_block))

    batch, num_heads, length, depth = qh.shape
    zeros = (
        jnp.zeros((batch, num_heads, k.shape[1], depth), "float32"),  # dK of a K/V shard
        jnp.zeros((batch, num_heads, v.shape[1], v.shape[-1]), "float32"),  # its dV
    )
    dq = jnp.zeros(qh.shape, "float32")
    dq, (dk, dv) = walk.run(index, dq, _travelling(sharding, k, v, data), gradients, zeros)
    dsink = None
    if sink is not None:
        # The sink's weight in each row is exp(sink - lse); d(output)/d(sink) = -weight * O.
        dsink = -jnp.sum(delta * jnp.exp(sink - lse), axis=(0, 2), keepdims=True)  # (1, H, 1, 1)
        dsink = jnp.sum(dsink, axis=1, keepdims=True) if sink.shape[1] == 1 else dsink
    transpose = (0, 2, 1, 3)  # back to (B, n, H, D)
    return (
        jnp.transpose(dq, transpose),
        jnp.transpose(dk, transpose),
        jnp.transpose(dv, transpose),
        dsink,
    )


def _zigzag_permutations(num_shards):
    """The two ``ppermute`` pairs that move a contiguous layout to the zig-zag one.

    Contiguously, device s holds chunks 2s (its first half) and 2s + 1; chunk m
    belongs to device m (m < P) or ``2P - 1 - m`` in the zig-zag layout. Every
    device sends its first half with one permutation and its second with the other.
    """

    def owner(chunk):
        return chunk if chunk < num_shards else 2 * num_shards - 1 - chunk

    first = [(s, owner(2 * s)) for s in range(num_shards)]
    second = [(s, owner(2 * s + 1)) for s in range(num_shards)]
    return first, second


def _swap_halves(index, first, second):
    """``(first, second)`` on even devices, ``(second, first)`` on odd ones.

    Device j's chunk j came in the first halves' permutation when j is even (it is
    chunk 2s of device s), in the second halves' when j is odd; its chunk 2P - 1 - j
    the other way round.
    """
    import jax.numpy as jnp

    even = index % 2 == 0
    return jnp.where(even, first, second), jnp.where(even, second, first)


def _reorder(x, axis_, axis, permutations, index):
    """One contiguous shard of x (along `axis_`) -> its zig-zag chunks (two permutes)."""
    import jax
    import jax.numpy as jnp

    half = x.shape[axis_] // 2
    halves = (
        jax.lax.slice_in_dim(x, 0, half, axis=axis_),
        jax.lax.slice_in_dim(x, half, 2 * half, axis=axis_),
    )
    moved = [jax.lax.ppermute(h, axis, p) for h, p in zip(halves, permutations, strict=True)]
    return jnp.concatenate(_swap_halves(index, *moved), axis=axis_)


def _to_zigzag(local, sharding, index):
    """The shards of `local` (contiguous along T) reordered to the zig-zag layout."""
    import jax.numpy as jnp

    axis, permutations = sharding.axis, _zigzag_permutations(sharding.num_shards)
    local = dict(local)
    q, k, v = local["query"], local["key"], local["value"]
    if q.dtype == k.dtype == v.dtype:  # one pair of permutes for all three
        qkv = _reorder(jnp.concatenate([q, k, v], axis=-1), 1, axis, permutations, index)
        sizes = np.cumsum([q.shape[-1], k.shape[-1]])
        local["query"], local["key"], local["value"] = jnp.split(qkv, sizes, axis=-1)
    else:
        for name in ("query", "key", "value"):
            local[name] = _reorder(local[name], 1, axis, permutations, index)
    if "query_ids" in local:
        ids = jnp.stack([local["query_ids"], local["key_ids"]], axis=-1)  # (B, T / P, 2)
        ids = _reorder(ids, 1, axis, permutations, index)
        local["query_ids"], local["key_ids"] = ids[..., 0], ids[..., 1]
    if sharding.mask_rows or sharding.mask_keys:
        along = 2 if sharding.mask_rows else 3
        local["mask"] = _reorder(local["mask"], along, axis, permutations, index)
    return local


def _from_zigzag(output, axis, num_shards, index):
    """``(B, T / P, H, Dv)`` in the zig-zag layout -> contiguous (two permutes back)."""
    import jax
    import jax.numpy as jnp

    half = output.shape[1] // 2
    # Undo `_swap_halves`: what came in the first halves' permutation goes back in it.
    back = _swap_halves(index, output[:, :half], output[:, half:])
    inverse = [[(b, a) for a, b in p] for p in _zigzag_permutations(num_shards)]
    moved = [jax.lax.ppermute(x, axis, p) for x, p in zip(back, inverse, strict=True)]
    return jnp.concatenate(moved, axis=1)


# -- halo -------------------------------------------------------------------------


# Patterns whose mask is a function of ``query - key`` alone (and their unions and
# intersections): the same pairs at positions shifted by any amount.
_SHIFT_INVARIANT = (
    patterns_module.Full,
    patterns_module.Causal,
    patterns_module.Local,
    patterns_module.Dilated,
    patterns_module.Strided,
)


def _shift_invariant(pattern):
    if isinstance(pattern, (patterns_module.Union, patterns_module.Intersection)):
        return all(_shift_invariant(p) for p in pattern.patterns)
    return type(pattern) in _SHIFT_INVARIANT


def _halo(components, sharding, band, settings, training):
    """Each device attends its queries to its keys and the `band` of its neighbours'.

    Where the pattern depends on ``query - key`` alone and no score_mod reads
    positions, a device's attention is an ordinary call of the engine
    (`keras_attn.dispatch.run`) with its queries at `before`, so the block-sparse
    path computes only the blocks within the band: memory proportional to the
    window, not to the shard. Otherwise it runs densely at absolute positions.

    Returns:
        ``(output (B, Tq, H, Dv), the plan of the last device's call or None)``.
    """
    import jax
    import jax.numpy as jnp

    axis, num_shards = sharding.axis, sharding.num_shards
    before, after = band
    # Not a ring: the first device receives nothing from before (zeros, masked out by
    # position), the last nothing from after.
    to_next = [(j, j + 1) for j in range(num_shards - 1)]
    to_previous = [(j + 1, j) for j in range(num_shards - 1)]
    engine = _shift_invariant(components.pattern) and not components.score_mods
    plans = []

    def send(x, pairs):
        return jax.lax.ppermute(x, axis, pairs) if pairs else jnp.zeros_like(x)

    def exchange(x):
        """``(B, n, ...)`` -> ``(B, before + n + after, ...)``: x with its neighbours' ends."""
        n = x.shape[1]
        parts = [x]
        if before:
            parts.insert(0, send(x[:, n - before :], to_next))
        if after:
            parts.append(send(x[:, :after], to_previous))
        return jnp.concatenate(parts, axis=1) if len(parts) > 1 else x

    def body(local):
        q, k, v, mask = local["query"], local["key"], local["value"], local.get("mask")
        n, num_heads = k.shape[1], q.shape[2]
        index = jax.lax.axis_index(axis).astype("int32")
        # One permute each way carries keys and values (side by side in the last
        # axis), a second one the keys' padding and segment ids: the window's halo
        # and nothing more.
        if k.dtype == v.dtype:
            kv = exchange(jnp.concatenate([k, v], axis=-1))  # (B, n + halo, H, D + Dv)
            k, v = kv[..., : k.shape[-1]], kv[..., k.shape[-1] :]
        else:
            k, v = exchange(k), exchange(v)
        key_ids = local.get("key_ids")
        key_mask = mask if sharding.mask_keys else None  # (B|1, H|1, 1, n)
        if key_ids is not None or key_mask is not None:
            key_ids, key_mask = _exchange_key_data(exchange, key_ids, key_mask)
        if key_mask is not None:
            mask = key_mask
        elif mask is not None and mask.shape[3] != 1:
            # A mask with both axes holds every key: the ones this device now has.
            mask = jnp.pad(mask, [(0, 0), (0, 0), (0, 0), (before, after)])
            mask = jax.lax.dynamic_slice_in_dim(mask, index * n, k.shape[1], axis=3)
        key_start = index * n - before  # absolute position of the first key here
        if engine:
            # Keys before the sequence (device 0's halo) or in its padding are not keys.
            key_positions = key_start + jnp.arange(k.shape[1], dtype="int32")
            valid = (key_positions >= 0) & (key_positions < sharding.key_length)
            mask = combine_masks(mask, valid.reshape(1, 1, 1, -1))
            segs = None
            if key_ids is not None:
                segs = segments_module.Segments(local["query_ids"], key_ids, same_stream=False)
            output, _, plan = dispatch.run(
                components, dispatch.Heads(q, k, v, mask, segs, before), settings, training=training
            )
            plans.append(plan)
            return output
        positions = make_positions(
            n, k.shape[1], num_heads, query_offset=index * n, key_offset=key_start
        )
        valid = (positions.key >= 0) & (positions.key < sharding.key_length)
        mask = combine_masks(mask, valid)
        if key_ids is not None:
            mask = combine_masks(mask, segments_module.segment_mask(local["query_ids"], key_ids))
        output, _ = kernels.dense_attention(
            jnp.transpose(q, (0, 2, 1, 3)),  # (B, H, n, D)
            jnp.transpose(k, (0, 2, 1, 3)),  # (B, H, n + halo, D)
            jnp.transpose(v, (0, 2, 1, 3)),  # (B, H, n + halo, Dv)
            components,
            positions,
            mask,
            training,
            return_weights=False,
        )
        return jnp.transpose(output, (0, 2, 1, 3))  # (B, n, H, Dv)

    output = sharding.map(body, sharding.heads_spec)
    return output, plans[-1] if plans else None


def _exchange_key_data(exchange, key_ids, key_mask):
    """Segment ids ``(B, n)`` and a key mask ``(B|1, H|1, 1, n)`` through one exchange."""
    import jax.numpy as jnp

    columns = []
    if key_ids is not None:
        columns.append(key_ids.astype("int32")[..., None])  # (B, n, 1)
    if key_mask is not None:
        batch = key_ids.shape[0] if key_ids is not None else key_mask.shape[0]
        as_columns = jnp.transpose(key_mask[:, :, 0], (0, 2, 1)).astype("int32")
        columns.append(jnp.broadcast_to(as_columns, (batch, *as_columns.shape[1:])))
    data = exchange(jnp.concatenate(columns, axis=-1))  # (B, n + halo, 1|0 + H|1)
    if key_ids is not None:
        key_ids, data = data[..., 0], data[..., 1:]
    if key_mask is not None:
        key_mask = jnp.transpose(data.astype(bool), (0, 2, 1))[:, :, None]  # (B, H|1, 1, ...)
    return key_ids, key_mask


def _block_data_mask(sharding, mask, travelling_mask, key_starts, key_length):
    """The data mask of some local queries against key chunks of `key_length` keys.

    `key_starts` are the chunks' first positions (a mask holding every key is sliced
    there); a travelling key mask is already these chunks'.
    """
    import jax
    import jax.numpy as jnp

    if mask is None:
        return None
    if sharding.mask_keys:
        return travelling_mask  # (B|1, H|1, 1, chunks * key_length)
    if mask.shape[3] == 1:
        return mask
    return jnp.concatenate(
        [jax.lax.dynamic_slice_in_dim(mask, s, key_length, axis=3) for s in key_starts], axis=3
    )


def _rectangles(blocks):
    """Bool ``(chunks, chunks)`` blocks -> ``[(query chunks, key chunks)]`` to merge.

    Query chunks that need the same key chunks share one merge (with two chunks a
    device, those are always adjacent: each side of a rectangle is contiguous).
    """
    groups = {}
    for row, needed in enumerate(blocks):
        columns = tuple(int(c) for c in np.flatnonzero(needed))
        if columns:
            groups.setdefault(columns, []).append(row)
    return [(tuple(rows), columns) for columns, rows in groups.items()]


def _block_positions(query_positions, key_positions, num_heads):
    """The `Positions` of a block: query ``(1, 1, rows, 1)``, key ``(1, 1, 1, columns)``."""
    import jax.numpy as jnp

    return Positions(
        query=query_positions.reshape(1, 1, -1, 1),
        key=key_positions.reshape(1, 1, 1, -1),
        head=jnp.arange(num_heads, dtype="int32").reshape(1, -1, 1, 1),
    )


def _block_logits(components, qh, kh, query_positions, key_positions):
    """The score and score_mods of queries ``(B, H, rows, D)`` against keys, float32."""
    positions = _block_positions(query_positions, key_positions, qh.shape[1])
    logits = components.score(qh, kh)  # (B, H, Tq, Tk)
    for mod in components.score_mods:
        logits = mod(logits, positions=positions)
    return logits.astype("float32")


def _merge_block(components, state, qh, kh, vh, query_positions, key_positions, data_mask):
    """Merge a block's partial softmax into the running state of its rows (log-sum-exp).

    Queries ``(B, H, rows, D)``, keys ``(B, H, Tk, D)``, values ``(B, H, Tk, Dv)``.
    """
    import jax
    import jax.numpy as jnp

    x = _block_logits(components, qh, kh, query_positions, key_positions)
    positions = _block_positions(query_positions, key_positions, qh.shape[1])
    mask = combine_masks(pattern_mask_or_none(components.pattern, positions), data_mask)
    if mask is not None:
        x = jnp.where(mask, x, NEG_INF)
    running_max, running_sum, running_output = state
    new_max = jax.lax.stop_gradient(jnp.maximum(running_max, x.max(axis=-1, keepdims=True)))
    e = jnp.exp(x - new_max)
    if mask is not None:
        e = jnp.where(mask, e, 0.0)
    correction = jnp.exp(running_max - new_max)
    running_sum = running_sum * correction + e.sum(axis=-1, keepdims=True)
    running_output = running_output * correction + jnp.matmul(e, vh.astype("float32"))
    return new_max, running_sum, running_output


def _sink_logits(normalizer, num_heads):
    """``sink_softmax``'s sink logits ``(1, H|1, 1, 1)`` (float32), or None for softmax."""
    if not isinstance(normalizer, SinkSoftmax):
        return None
    sinks = ops.cast(normalizer.sinks, "float32")
    count = 1 if normalizer.num_heads == 1 else num_heads
    return ops.reshape(sinks, (1, count, 1, 1))


def _finish(state, sink):
    """The merged output: the running output over the running sum (plus the sink)."""
    import jax
    import jax.numpy as jnp

    running_max, running_sum, running_output = state
    if sink is None:
        # A row with no allowed key has a sum of 0 and gets zeros, as on one device.
        has_key = running_sum > 0
        return jnp.where(has_key, running_output / jnp.where(has_key, running_sum, 1.0), 0.0)
    top = jax.lax.stop_gradient(jnp.maximum(running_max, sink))
    scale = jnp.exp(running_max - top)
    return running_output * scale / (running_sum * scale + jnp.exp(sink - top))
