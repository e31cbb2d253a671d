"""Checks that a component honours its interface, for plugin authors' tests.

Each ``check_*`` function takes a component class (built with no arguments) or an
instance, runs it on the current Keras backend and raises ``AssertionError`` with a
message saying what does not hold. A plugin's test file can then be a few lines::

    from keras_attn import testing
    from my_package.plugin import MyNormalizer

    def test_my_normalizer():
        testing.check_normalizer(MyNormalizer, sums_to_one=True)

What is checked, for every kind:

- the class subclasses the right base and sets ``name``;
- shapes: the component works on tensors with any leading dims ``(..., Tq, Tk)``
  (the engine may call it on blocks of a sparse layout) and each slice of the
  leading dims is computed on its own;
- ``get_config`` is JSON-serializable and ``from_config(get_config())`` gives an
  equal component (same config, same numbers);
- a model using the component runs eagerly and compiled, saves as ``.keras`` and
  loads back with the same outputs (the component must be registered: install the
  plugin, or register it for the test with ``registered`` or the
  ``keras_attn_tmp_plugin`` fixture), and a training step gives finite numbers.

Normalizers are also checked for zero weight on masked pairs, all-zero (never NaN)
rows where no key is allowed, and float16/bfloat16 logits; patterns for a truthful
``causal`` flag, absolute positions and an exact ``block_mask``.

Installing keras_attn also installs a pytest plugin (`keras_attn.pytest_plugin`) with
two fixtures: ``keras_attn_check`` (the checks) and ``keras_attn_tmp_plugin``
(register component classes for the duration of one test).
"""

import contextlib
import json
import os
import tempfile
import types

import keras
import numpy as np
from keras import ops

from keras_attn import plugins
from keras_attn.block_layout import num_blocks
from keras_attn.hookspecs import hookimpl
from keras_attn.positions import Positions
from keras_attn.positions import make_positions

__all__ = [
    "check_component",
    "check_layer",
    "check_normalizer",
    "check_pattern",
    "check_position_encoding",
    "check_score",
    "check_score_mod",
    "plugin_for",
    "registered",
    "value_and_grads",
]

# Shapes of the probe tensors: batch, heads, query length, key length, head dim.
B, H, TQ, TK, D = 2, 2, 6, 7, 4


def _fail(what, message):
    raise AssertionError(f"{what}: {message}")


def _run(what, context, fn, *args, **kwargs):
    """Call the component under check; an error it raises is a failed check, saying where."""
    try:
        return fn(*args, **kwargs)
    except AssertionError:
        raise
    except Exception as error:
        raise AssertionError(
            f"{what}: raised {type(error).__name__} when {context}: {error}"
        ) from error


def _numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def _rng(seed=0):
    return np.random.default_rng(seed)


def _instance(component, kind):
    """The instance to check, and its description for messages."""
    cls = component if isinstance(component, type) else type(component)
    what = f"{kind} {cls.__module__}.{cls.__qualname__}"
    actual = plugins.kind_of(cls)
    if actual != kind:
        base = plugins.base_class(kind)
        _fail(
            what,
            f"expected a subclass of {plugins.public_name(base)}; it is "
            f"{'a ' + actual if actual else 'not a keras_attn component'}.",
        )
    name = plugins.registry_name(cls)
    if kind != "layer" and cls.__dict__.get("name") is None and name is None:
        _fail(what, "set the class attribute `name` to its registry name, e.g. name = 'my_score'.")
    if isinstance(component, type):
        try:
            component = cls()
        except TypeError as e:
            _fail(what, f"cannot be built without arguments ({e}); pass an instance instead.")
    return component, f"{what} (name={name!r})"


def _assert_finite(x, what, context):
    x = _numpy(x).astype("float64")
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        _fail(what, f"{context} has non-finite values (NaN or inf), first at index {tuple(bad)}.")


def _assert_close(actual, expected, what, context, atol=1e-5, rtol=1e-5):
    actual = _numpy(actual).astype("float64")
    expected = _numpy(expected).astype("float64")
    if actual.shape != expected.shape:
        _fail(what, f"{context}: shape {actual.shape}, expected {expected.shape}.")
    if not np.allclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True):
        err = np.max(np.abs(actual - expected))
        _fail(what, f"{context}: values differ (max abs difference {err:.3g}).")


def _assert_shape(x, shape, what, context):
    if tuple(x.shape) != tuple(shape):
        _fail(what, f"{context}: expected shape {tuple(shape)}. Received: shape={tuple(x.shape)}")


def _slab_keys(key_length, rows, seed=0):
    """For each of `rows` rows of query blocks, the key indices it gathers.

    Mimics the block-sparse path, where each row of query blocks sees only the keys
    of its kept blocks: here a different random subset of the keys per row, in a
    different order.
    """
    rng = _rng(seed)
    return np.stack([rng.permutation(key_length)[: key_length - 2] for _ in range(rows)])


def _slab_positions(query_length, key_length, heads, keys):
    """Positions in a slab layout: the query axis split into ``len(keys)`` rows of
    blocks, each with its own keys: query ``(1, 1, R, Tq / R, 1)``, key
    ``(1, 1, R, 1, K)``, head ``(1, H, 1, 1, 1)``."""
    rows = len(keys)
    query = np.arange(query_length, dtype="int32").reshape(1, 1, rows, query_length // rows, 1)
    return Positions(
        query=ops.convert_to_tensor(query),
        key=ops.convert_to_tensor(keys.astype("int32").reshape(1, 1, rows, 1, -1)),
        head=ops.convert_to_tensor(np.arange(heads, dtype="int32").reshape(1, heads, 1, 1, 1)),
    )


def _to_slab(x, keys):
    """``(..., Tq, Tk) -> (..., R, Tq / R, K)``: each row of query blocks with its keys."""
    x = _numpy(x)
    rows = len(keys)
    blocks = x.reshape(x.shape[:-2] + (rows, x.shape[-2] // rows, x.shape[-1]))
    return np.stack([blocks[..., r, :, :][..., keys[r]] for r in range(rows)], axis=-3)


# -- config ---------------------------------------------------------------------------


def _config_round_trip(instance, what):
    """A clone built by ``from_config(get_config())``, checked to have the same config."""
    config = instance.get_config()
    if not isinstance(config, dict):
        _fail(what, f"get_config() must return a dict. Received: {config!r}")
    try:
        text = json.dumps(config)
    except (TypeError, ValueError) as e:
        _fail(
            what,
            f"get_config() is not JSON-serializable, so it cannot go into a .keras file "
            f"({e}). Serialize initializers etc. with keras.*.serialize.",
        )
    try:
        clone = type(instance).from_config(json.loads(text))
    except Exception as e:
        _fail(
            what,
            f"from_config(get_config()) failed: {type(e).__name__}: {e}. Every constructor "
            "argument must be in get_config(), under its own name.",
        )
    if clone.get_config() != config:
        diff = {
            k: (config.get(k), clone.get_config().get(k))
            for k in set(config) | set(clone.get_config())
            if config.get(k) != clone.get_config().get(k)
        }
        _fail(
            what,
            "from_config(get_config()) does not give the same config; differing keys "
            f"(original, rebuilt): {diff}. Does get_config() return every constructor argument?",
        )
    return clone


def _copy_weights(source, target, what):
    if len(source.weights) != len(target.weights):
        _fail(
            what,
            f"the clone from get_config() has {len(target.weights)} weights, the original "
            f"{len(source.weights)}: build() must depend only on the config and input shapes.",
        )
    target.set_weights(source.get_weights())


# -- a model using the component --------------------------------------------------------


def _attention_model(layer, input_shapes):
    inputs = [keras.Input(shape[1:], batch_size=shape[0]) for shape in input_shapes]
    outputs = layer(*inputs)
    if isinstance(outputs, (list, tuple)):
        outputs = outputs[0]
    return keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs)


def _check_model(make_layer, what, input_shapes=((B, TQ, 8),), train=True, save=True):
    """A model using the component: eager == compiled, trains, saves and loads."""
    rng = _rng(1)
    try:
        model = _attention_model(make_layer(), input_shapes)
    except plugins.UnknownComponentError as e:
        _fail(what, _not_registered(e))
    xs = [rng.normal(size=shape).astype("float32") for shape in input_shapes]
    x = xs if len(xs) > 1 else xs[0]
    eager = model(x)
    _assert_finite(eager, what, "a model using it (eager call)")
    compiled = model.predict(x, verbose=0, batch_size=input_shapes[0][0])
    _assert_close(
        compiled, eager, what, "a model using it, compiled (predict) vs eager", 1e-4, 1e-4
    )
    if train:
        model.compile(optimizer="sgd", loss="mse")
        y = rng.normal(size=tuple(eager.shape)).astype("float32")
        loss = model.fit(x, y, epochs=1, verbose=0, batch_size=len(y)).history["loss"][-1]
        if not np.isfinite(loss):
            _fail(what, f"a training step of a model using it gives loss={loss}.")
        eager = model(x)
    if save:
        _check_save_load(model, x, eager, what)
    return model


def _not_registered(error):
    return (
        "it is not registered, so a model using it cannot be serialized. Install your "
        "plugin package (pip install -e .) so its entry point registers it, or register "
        "it for the test with `keras_attn.testing.registered(...)` or the "
        f"`keras_attn_tmp_plugin` fixture. ({error})"
    )


def _check_save_load(model, x, expected, what):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        try:
            model.save(path)
        except plugins.UnknownComponentError as e:
            _fail(what, _not_registered(e))
        except Exception as e:
            _fail(what, f"a model using it cannot be saved as .keras: {type(e).__name__}: {e}")
        try:
            loaded = keras.saving.load_model(path)
        except Exception as e:
            _fail(
                what,
                f"a model using it was saved as .keras but does not load back: "
                f"{type(e).__name__}: {e}",
            )
    _assert_close(loaded(x), expected, what, "the model loaded from .keras", 1e-5)


def _attention(**components):
    from keras_attn.layers import Attention

    return Attention(num_heads=H, key_dim=D, **components)


# -- scores -----------------------------------------------------------------------------


def check_score(score, *, save=True, train=True, atol=1e-5):
    """Check a `keras_attn.Score` class or instance.

    ``score(query (..., Tq, D), key (..., Tk, D))`` must give finite logits
    ``(..., Tq, Tk)`` for any leading dims, slice by slice; the config must round
    trip; a model using it must run, train, save and load.

    Raises:
        AssertionError: saying what does not hold.
    """
    score, what = _instance(score, "score")
    rng = _rng()
    query = rng.normal(size=(B, H, TQ, D)).astype("float32")
    key = rng.normal(size=(B, H, TK, D)).astype("float32")
    logits = score(query, key)
    _assert_shape(logits, (B, H, TQ, TK), what, "score(query (B, H, Tq, D), key (B, H, Tk, D))")
    _assert_finite(logits, what, "its logits")
    for lead in [(), (B, H, 1)]:
        q = query.reshape((-1, TQ, D))
        k = key.reshape((-1, TK, D))
        expected = _numpy(logits).reshape((-1, TQ, TK))
        if lead == ():
            out, expected = score(q[1], k[1]), expected[1]
        else:
            out = score(q.reshape(lead + (TQ, D)), k.reshape(lead + (TK, D)))
            expected = expected.reshape(lead + (TQ, TK))
        _assert_close(out, expected, what, f"called with leading dims {lead}", atol, atol)
    clone = _config_round_trip(score, what)
    clone(query, key)
    _copy_weights(score, clone, what)
    _assert_close(clone(query, key), logits, what, "the clone from get_config()", atol, atol)
    _check_model(lambda: _attention(score=_fresh(score)), what, train=train, save=save)


def _fresh(component):
    """An unbuilt copy of a layer component, for a model of its own."""
    return type(component).from_config(component.get_config())


# -- score_mods -----------------------------------------------------------------------


def check_score_mod(score_mod, *, save=True, train=True, atol=1e-5):
    """Check a `keras_attn.ScoreMod` class or instance.

    ``score_mod(logits (..., Tq, Tk), positions=positions)`` must give finite
    logits of the same shape and dtype, also when the query axis is split into
    blocks (positions then come in the same layout); the config must round trip; a
    model using it must run, train, save and load. A ``num_heads`` attribute that is
    None is set, as the attention layer does.

    Raises:
        AssertionError: saying what does not hold.
    """
    score_mod, what = _instance(score_mod, "score_mod")
    if getattr(score_mod, "num_heads", "unset") is None:
        score_mod.num_heads = H
    rng = _rng()
    logits = rng.normal(size=(B, H, TQ, TK)).astype("float32")
    positions = make_positions(TQ, TK, H)
    out = score_mod(logits, positions=positions)
    _assert_shape(out, logits.shape, what, "score_mod(logits (B, H, Tq, Tk), positions)")
    if ops.dtype(out) != "float32":
        _fail(what, f"float32 logits came back as {ops.dtype(out)}; keep the logits' dtype.")
    _assert_finite(out, what, "its output")
    keys = _slab_keys(TK, 2)
    blocked = score_mod(_to_slab(logits, keys), positions=_slab_positions(TQ, TK, H, keys))
    _assert_close(
        blocked,
        _to_slab(out, keys),
        what,
        "logits in a block-sparse slab layout (B, H, 2, Tq/2, K), each row of query "
        "blocks with its own gathered keys, and positions in that layout",
        atol,
        atol,
    )
    half = score_mod(logits[:, :, TQ // 2 :], positions=make_positions(TQ // 2, TK, H, TQ // 2))
    _assert_close(
        half,
        _numpy(out)[:, :, TQ // 2 :],
        what,
        "the last Tq/2 rows alone, with query positions starting at Tq/2 (KV-cache decoding)",
        atol,
        atol,
    )
    clone = _config_round_trip(score_mod, what)
    clone(logits, positions=positions)
    _copy_weights(score_mod, clone, what)
    _assert_close(clone(logits, positions=positions), out, what, "the clone from get_config()")
    _check_model(lambda: _attention(score_mods=[_fresh(score_mod)]), what, train=train, save=save)


# -- patterns ---------------------------------------------------------------------------


def _dense_mask(pattern, query_length, key_length, heads=1, query_offset=0):
    positions = make_positions(query_length, key_length, heads, query_offset)
    mask = pattern.mask(positions)
    return np.broadcast_to(_numpy(mask), (1, heads, query_length, key_length))


def check_pattern(pattern, *, block_size=4, save=True, train=True):
    """Check a `keras_attn.Pattern` class or instance.

    ``pattern.mask(positions)`` must be a bool tensor broadcastable to the logits,
    computed from absolute positions only (a query block at an offset sees the rows
    of the full mask at that offset; positions split into blocks give the same mask
    split into blocks); ``causal`` must be true only if no query sees a later key;
    ``block_mask`` must mark exactly the blocks holding an allowed pair; the config
    must round trip; a model using it must run, train, save and load.

    Raises:
        AssertionError: saying what does not hold.
    """
    pattern, what = _instance(pattern, "pattern")
    tq, tk = 3 * block_size + 1, 4 * block_size - 1
    tm = 2 * block_size + 2  # an even query length, split into two blocks below
    positions = make_positions(tm, tk, H)
    mask = pattern.mask(positions)
    if ops.dtype(mask) != "bool":
        _fail(what, f"mask() must return a bool tensor. Received: dtype={ops.dtype(mask)}")
    try:
        full = np.broadcast_to(_numpy(mask), (1, H, tm, tk))
    except ValueError:
        _fail(what, f"mask() of shape {tuple(mask.shape)} does not broadcast to (1, H, Tq, Tk).")
    if not np.array_equal(_dense_mask(pattern, tm, tk, H), full):
        _fail(what, "mask() differs between two calls with the same positions.")
    keys = _slab_keys(tk, 2)
    blocked = pattern.mask(_slab_positions(tm, tk, H, keys))
    half = tm // 2
    expected = _to_slab(full, keys)
    try:
        blocked = np.broadcast_to(_numpy(blocked), expected.shape)
    except ValueError:
        _fail(what, "mask() does not broadcast when positions have a block-sparse slab layout.")
    if not np.array_equal(blocked, expected):
        _fail(
            what,
            "mask() in a block-sparse slab layout (each row of query blocks with its own "
            "gathered keys) differs from the full mask: it must be a function of each "
            "(query, key, head) position triple alone, not of lengths or of other keys.",
        )
    offset = _dense_mask(pattern, tm - half, tk, H, query_offset=half)
    if not np.array_equal(offset, full[:, :, half:]):
        _fail(
            what,
            f"mask() for queries starting at position {half} differs from rows {half}: of "
            "the full mask: use the absolute positions given, not 0-based indices.",
        )
    if pattern.causal and np.any(np.triu(full, k=1)):
        _fail(what, "`causal` is True, but the mask lets a query see a later key.")
    _check_block_mask(pattern, what, block_size, tq, tk)
    clone = _config_round_trip(pattern, what)
    if not np.array_equal(_dense_mask(clone, tm, tk, H), full):
        _fail(what, "the clone from get_config() gives a different mask.")
    if clone != pattern:
        _fail(what, "the clone from get_config() does not compare equal (==) to the original.")
    _check_model(lambda: _attention(pattern=_fresh_pattern(pattern)), what, train=train, save=save)


def _fresh_pattern(pattern):
    return type(pattern).from_config(pattern.get_config())


def _check_block_mask(pattern, what, block_size, tq, tk):
    for query_length, key_length, offset in [
        (tq, tk, 0),
        (tk, tk, 0),
        (tq - 2, tk, block_size + 1),
    ]:
        dense = _dense_mask(pattern, query_length, key_length, H, offset).any(axis=(0, 1))
        n_q, n_k = num_blocks(query_length, block_size), num_blocks(key_length, block_size)
        padded = np.zeros((n_q * block_size, n_k * block_size), dtype=bool)
        padded[:query_length, :key_length] = dense
        expected = padded.reshape(n_q, block_size, n_k, block_size).any(axis=(1, 3))
        args = f"block_mask({query_length}, {key_length}, {block_size}, query_offset={offset})"
        got = np.asarray(pattern.block_mask(query_length, key_length, block_size, offset))
        if got.shape != expected.shape or got.dtype != bool:
            _fail(
                what,
                f"{args} must be a bool array of shape {expected.shape}. "
                f"Received: dtype={got.dtype}, shape={got.shape}",
            )
        missing = np.argwhere(expected & ~got)
        if len(missing):
            _fail(
                what,
                f"{args} leaves out blocks holding allowed pairs, first block "
                f"{tuple(missing[0])}: the block-sparse path would drop them.",
            )
        extra = np.argwhere(got & ~expected)
        if len(extra):
            _fail(what, f"{args} marks empty blocks, first block {tuple(extra[0])}.")


# -- normalizers ----------------------------------------------------------------------


def _probe_mask(rng, shape):
    """A random mask with one fully masked and one fully allowed row."""
    mask = rng.random(shape) < 0.6
    mask[0, 0, 1, :] = False
    mask[..., 2, :] = True
    return mask


def check_normalizer(normalizer, *, sums_to_one=False, save=True, train=True, atol=1e-5):
    """Check a `keras_attn.Normalizer` class or instance.

    ``normalizer(logits (..., Tq, Tk), mask=mask, training=training)`` must give
    finite weights of the logits' shape and dtype, exactly zero where the mask is
    False, all zeros (never NaN) on rows with no allowed key, for any leading dims
    and masks broadcast over the heads, for large logits and for float16/bfloat16
    logits; the config must round trip; a model using it must run, train, save and
    load.

    Args:
        sums_to_one: Also check the weights are >= 0 and each row with an allowed
            key sums to 1.

    Raises:
        AssertionError: saying what does not hold.
    """
    normalizer, what = _instance(normalizer, "normalizer")
    rng = _rng()
    logits = (3 * rng.normal(size=(B, H, TQ, TK))).astype("float32")
    mask = _probe_mask(rng, (B, 1, TQ, TK))  # broadcast over heads, as the engine does
    weights = _run(
        what, "called with a (B, 1, Tq, Tk) mask", normalizer, logits, mask=mask, training=False
    )
    _check_weights(
        weights, logits, mask, what, "float32 logits, a (B, 1, Tq, Tk) mask", sums_to_one
    )
    for lead in [(), (B, H, 1)]:
        full_mask = np.broadcast_to(mask, logits.shape)
        if lead == ():
            out = _run(
                what,
                "called without leading dims",
                normalizer,
                logits[1, 0],
                mask=full_mask[1, 0],
                training=False,
            )
            expected = _numpy(weights)[1, 0]
        else:
            shape = lead + (TQ, TK)
            out = _run(
                what,
                f"called with leading dims {lead}",
                normalizer,
                logits.reshape(shape),
                mask=full_mask.reshape(shape),
                training=False,
            )
            expected = _numpy(weights).reshape(shape)
        _assert_close(out, expected, what, f"called with leading dims {lead}", atol, atol)
    # mask=None: the engine passes no mask when every pair is allowed.
    unmasked = _run(
        what,
        "called with mask=None (every pair allowed)",
        normalizer,
        logits,
        mask=None,
        training=False,
    )
    _check_weights(unmasked, logits, None, what, "mask=None", sums_to_one)
    for scale in (1e4, -1e4):
        big = _run(
            what,
            f"called with logits times {scale:g}",
            normalizer,
            logits * scale,
            mask=mask,
            training=False,
        )
        _check_weights(big, logits, mask, what, f"logits times {scale:g}", sums_to_one)
    trained = _run(what, "called with training=True", normalizer, logits, mask=mask, training=True)
    _check_weights(trained, logits, mask, what, "training=True", sums_to_one)
    for dtype in ("float16", "bfloat16"):
        # As inside a layer under the mixed_float16 / mixed_bfloat16 policy.
        config = {**normalizer.get_config(), "dtype": f"mixed_{dtype}"}
        out = _run(
            what,
            f"called on {dtype} logits",
            type(normalizer).from_config(config),
            ops.cast(logits, dtype),
            mask=mask,
            training=False,
        )
        if ops.dtype(out) != dtype:
            _fail(what, f"{dtype} logits came back as {ops.dtype(out)}; keep the logits' dtype.")
        _check_weights(out, logits, mask, what, f"{dtype} logits", sums_to_one, atol=1e-2)
    clone = _config_round_trip(normalizer, what)
    clone(logits, mask=mask, training=False)
    _copy_weights(normalizer, clone, what)
    _assert_close(
        clone(logits, mask=mask, training=False), weights, what, "the clone from get_config()"
    )
    _check_model(lambda: _attention(normalizer=_fresh(normalizer)), what, train=train, save=save)


def _check_weights(weights, logits, mask, what, context, sums_to_one, atol=1e-5):
    _assert_shape(weights, logits.shape, what, f"weights ({context})")
    w = _numpy(weights).astype("float64")
    if not np.all(np.isfinite(w)):
        rows = np.argwhere(~np.isfinite(w).all(axis=-1))
        empty = mask is not None and not np.broadcast_to(mask, w.shape)[tuple(rows[0])].any()
        _fail(
            what,
            f"NaN or inf weights ({context}) in row {tuple(rows[0])}"
            + (", a row with no allowed key: such a row must get all zeros" if empty else "")
            + ".",
        )
    if mask is not None:
        allowed = np.broadcast_to(mask, w.shape)
        leaked = np.argwhere(~allowed & (w != 0))
        if len(leaked):
            _fail(
                what,
                f"masked-out pairs get non-zero weight ({context}), e.g. {w[tuple(leaked[0])]:.3g} "
                f"at {tuple(leaked[0])}: masked pairs must get exactly 0.",
            )
    else:
        allowed = np.ones(w.shape, dtype=bool)
    if sums_to_one:
        if np.any(w < 0):
            _fail(what, f"negative weights ({context}), min {w.min():.3g}.")
        has_key = allowed.any(axis=-1)
        sums = w.sum(axis=-1)
        bad = np.argwhere(has_key & ~np.isclose(sums, 1.0, atol=max(atol, 1e-5)))
        if len(bad):
            _fail(
                what, f"row {tuple(bad[0])} sums to {sums[tuple(bad[0])]:.6g}, not 1 ({context})."
            )


# -- layers -------------------------------------------------------------------------------


def check_layer(layer, *, input_shapes=((B, TQ, 8),), save=True, train=True, atol=1e-5):
    """Check an attention layer class or instance registered with ``register_layers``.

    The layer is called as ``layer(*inputs)`` with random float inputs of
    `input_shapes` (default one ``(B, T, dim)`` input, i.e. self-attention; pass two
    shapes for a layer that needs a context). It must give finite outputs, the
    config must round trip (same outputs after copying the weights), and a model
    using it must run, train, save and load.

    Raises:
        AssertionError: saying what does not hold.
    """
    layer, what = _instance(layer, "layer")
    rng = _rng()
    xs = [rng.normal(size=shape).astype("float32") for shape in input_shapes]
    out = layer(*xs)
    out = out[0] if isinstance(out, (list, tuple)) else out
    _assert_finite(out, what, "its output")
    clone = _config_round_trip(layer, what)
    clone(*xs)  # builds it
    _copy_weights(layer, clone, what)
    clone_out = clone(*xs)
    clone_out = clone_out[0] if isinstance(clone_out, (list, tuple)) else clone_out
    _assert_close(clone_out, out, what, "the clone from get_config()", atol, atol)
    _check_model(lambda: _fresh(layer), what, input_shapes=input_shapes, train=train, save=save)


# -- position encodings ---------------------------------------------------------------


def check_position_encoding(position_encoding, *, save=True, train=True, atol=1e-5):
    """Check a `keras_attn.PositionEncoding` class or instance.

    ``encoding(query (..., T, D), key (..., T, D), positions)`` with integer positions
    broadcastable to ``(..., T)`` must give finite ``(query, key)`` of the same shapes
    and dtypes, for any leading dims, slice by slice; it must depend on the
    positions, and encode a token the same way whichever call it comes in (the last
    T/2 rows alone with positions from T/2, as in KV-cache decoding); the config
    must round trip; a layer using it must decode with a cache as it runs the whole
    sequence (positions honoured under a cache offset); a model using it must run,
    train, save and load.

    Raises:
        AssertionError: saying what does not hold.
    """
    encoding, what = _instance(position_encoding, "position_encoding")
    rng = _rng()
    query = rng.normal(size=(B, H, TQ, D)).astype("float32")
    key = rng.normal(size=(B, H, TQ, D)).astype("float32")
    positions = np.arange(TQ, dtype="int32")[None, None, :]  # (1, 1, T)
    out = encoding(query, key, positions)
    if not isinstance(out, (list, tuple)) or len(out) != 2:
        _fail(what, f"call(query, key, positions) must return (query, key). Received: {out!r}")
    q, k = out
    for name, x, ref in (("query", q, query), ("key", k, key)):
        _assert_shape(x, ref.shape, what, f"the encoded {name} (B, H, T, D)")
        if ops.dtype(x) != "float32":
            _fail(what, f"float32 heads came back as {ops.dtype(x)}; keep the heads' dtype.")
        _assert_finite(x, what, f"the encoded {name}")
    q1, k1 = encoding(query[1], key[1], positions[0])
    _assert_close(q1, _numpy(q)[1], what, "the query called with leading dims (H,)", atol, atol)
    _assert_close(k1, _numpy(k)[1], what, "the key called with leading dims (H,)", atol, atol)
    half = TQ // 2
    q2, k2 = encoding(query[..., half:, :], key[..., half:, :], positions[..., half:])
    context = "the last T/2 rows alone, with positions from T/2 (KV-cache decoding)"
    _assert_close(q2, _numpy(q)[..., half:, :], what, f"the query of {context}", atol, atol)
    _assert_close(k2, _numpy(k)[..., half:, :], what, f"the key of {context}", atol, atol)
    shifted = _numpy(encoding(query, key, positions + 3)[0])
    if np.allclose(shifted, _numpy(q), atol=1e-6):
        _fail(what, "positions + 3 give the same query as positions: the positions are ignored.")
    clone = _config_round_trip(encoding, what)
    clone(query, key, positions)
    _copy_weights(encoding, clone, what)
    _assert_close(clone(query, key, positions)[0], q, what, "the clone from get_config()")
    _check_cached_decoding(encoding, what, atol)
    _check_model(
        lambda: _attention(position_encoding=_fresh(encoding)), what, train=train, save=save
    )


def _check_cached_decoding(encoding, what, atol):
    """A layer with the encoding decodes token by token as it runs the whole sequence."""
    layer = _attention(position_encoding=_fresh(encoding))
    x = _rng(2).normal(size=(B, TQ, 8)).astype("float32")
    whole = _numpy(layer(x, use_causal_mask=True))
    cache = ops.zeros(layer.cache_shape(B, TQ))
    half = TQ // 2
    steps = [(0, half)] + [(i, i + 1) for i in range(half, TQ)]
    for start, stop in steps:
        out, cache = layer(
            x[:, start:stop], cache=cache, cache_update_index=start, use_causal_mask=True
        )
        _assert_close(
            out,
            whole[:, start:stop],
            what,
            f"a layer decoding with a KV cache, tokens {start}..{stop - 1} written at "
            f"cache index {start}, vs the whole sequence (are positions honoured?)",
            1e-4,
            1e-4,
        )


# -- dispatch -------------------------------------------------------------------------------

_CHECKS = {
    "score": check_score,
    "score_mod": check_score_mod,
    "pattern": check_pattern,
    "normalizer": check_normalizer,
    "position_encoding": check_position_encoding,
    "layer": check_layer,
}


def check_component(component, **kwargs):
    """Run the check for `component`'s kind (``check_score``, ``check_pattern``, ...).

    `component` is a class or an instance; a ``(kind, name)`` pair such as
    ``("normalizer", "entmax15")`` checks the registered class of that name (which
    also checks that the plugin registered it).

    Raises:
        AssertionError: saying what does not hold.
    """
    if isinstance(component, tuple):
        kind, name = component
        try:
            component = plugins.get(kind, name)
        except plugins.UnknownComponentError as e:
            raise AssertionError(str(e)) from None
    kind = plugins.kind_of(component)
    if kind is None:
        raise AssertionError(
            f"Not a keras_attn component: {component!r}. Expected a subclass (or an "
            "instance) of keras_attn.Score, ScoreMod, Pattern, Normalizer, PositionEncoding "
            "or keras.layers.Layer."
        )
    return _CHECKS[kind](component, **kwargs)


# -- registering components for a test ---------------------------------------------------


def plugin_for(*classes, **by_kind):
    """An in-process plugin object whose hooks register `classes`.

    Each class is registered under its own kind (a Pattern with ``register_patterns``
    and so on). Pass ``score=[...]``, ``pattern=[...]``, ... to register classes with
    the hook of that kind whatever they are (to test what happens when they are not).
    """
    hooks = {}
    for cls in classes:
        kind = plugins.kind_of(cls)
        if kind is None:
            raise TypeError(f"plugin_for() takes keras_attn component classes. Received: {cls!r}")
        hooks.setdefault(kind, []).append(cls)
    for kind, extra in by_kind.items():
        plugins.check_kind(kind)
        hooks.setdefault(kind, []).extend(extra)
    plugin = types.SimpleNamespace()
    for kind, group in hooks.items():

        def hook(register, group=tuple(group)):
            for cls in group:
                register(cls)

        hook.__name__ = plugins.KINDS[kind]
        setattr(plugin, plugins.KINDS[kind], hookimpl(hook))
    return plugin


def _already_registered(cls):
    kind = plugins.kind_of(cls)
    name = getattr(cls, "name", None)
    return isinstance(name, str) and name in plugins.names(kind) and plugins.get(kind, name) is cls


@contextlib.contextmanager
def registered(*items, name=None, **by_kind):
    """Register component classes (or a plugin object) while the block runs.

    ``with registered(MyScore, MyPattern): ...`` makes ``"my_score"`` and
    ``"my_pattern"`` resolvable by name (and savable in `.keras` files) inside the
    block. An item that is not a component class is taken as a plugin object with
    ``@keras_attn.hookimpl`` functions. A class already registered under its name
    (e.g. by the installed plugin package it comes from) is left as it is, so the
    same test passes before and after the plugin is installed.
    """
    classes = [
        i
        for i in items
        if isinstance(i, type) and plugins.kind_of(i) is not None and not _already_registered(i)
    ]
    others = [i for i in items if not (isinstance(i, type) and plugins.kind_of(i) is not None)]
    registered_plugins = []
    try:
        if classes or by_kind:
            plugin = plugin_for(*classes, **by_kind)
            label = name or "test-plugin:" + ",".join(c.__name__ for c in classes)
            plugins.register(plugin, name=label)
            registered_plugins.append(plugin)
        for other in others:
            plugins.register(other, name=name)
            registered_plugins.append(other)
        yield registered_plugins[0] if len(registered_plugins) == 1 else registered_plugins
    finally:
        for plugin in reversed(registered_plugins):
            plugins.unregister(plugin)


def value_and_grads(fn, *inputs, variables=(), has_aux=False):
    """A scalar function's value and its gradients, by the backend's own autodiff.

    For tests that compare gradients (a hand-written gradient against autodiff, one
    path against another, float16 against float32) on TensorFlow, JAX and PyTorch
    alike.

    Args:
        fn: Called as ``fn(*inputs)``; returns a scalar tensor, or ``(scalar, aux)``
            with ``has_aux=True``.
        *inputs: Numpy arrays (float), differentiated.
        variables: Keras variables `fn` reads (e.g. ``layer.trainable_variables``),
            differentiated too.
        has_aux: Whether `fn` also returns an auxiliary value (not differentiated).

    Returns:
        ``(value, grads)`` — or ``(value, grads, aux)`` with `has_aux` — where
        `value` is a float and `grads` a list of numpy arrays, one per input then
        one per variable (zeros where the function does not depend on it).
    """
    import keras

    variables = list(variables)
    backend = keras.backend.backend()

    def split(result):
        return result if has_aux else (result, None)

    if backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.constant(x) for x in inputs]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            y, aux = split(fn(*tensors))
        grads = tape.gradient(y, tensors + variables)
        grads = [
            tf.zeros_like(t) if g is None else g
            for g, t in zip(grads, tensors + variables, strict=True)
        ]
    elif backend == "jax":
        import jax

        def stateless(values, *tensors):
            mapping = list(zip(variables, values, strict=True))
            with keras.StatelessScope(state_mapping=mapping):
                y, aux = split(fn(*tensors))
            return y, aux

        argnums = tuple(range(len(inputs) + 1))
        (y, aux), grads = jax.value_and_grad(stateless, argnums=argnums, has_aux=True)(
            [v.value for v in variables], *inputs
        )
        grads = list(grads[1:]) + list(grads[0])
    elif backend == "torch":
        import torch

        tensors = [torch.tensor(np.asarray(x), requires_grad=True) for x in inputs]
        params = [v.value for v in variables]
        for p in params:
            p.grad = None
        y, aux = split(fn(*tensors))
        y.backward()
        grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in tensors + params]
        grads = [g.detach().cpu() for g in grads]
        y = y.detach()
    else:
        raise NotImplementedError(f"value_and_grads: unsupported backend {backend!r}")
    out = (float(_numpy(ops.cast(y, "float32"))), [_numpy(ops.cast(g, "float32")) for g in grads])
    return (*out, aux) if has_aux else out


class Checker:
    """The checks as one object: ``check(component)`` or ``check.normalizer(...)``."""

    score = staticmethod(check_score)
    score_mod = staticmethod(check_score_mod)
    pattern = staticmethod(check_pattern)
    normalizer = staticmethod(check_normalizer)
    position_encoding = staticmethod(check_position_encoding)
    layer = staticmethod(check_layer)

    def __call__(self, component, **kwargs):
        return check_component(component, **kwargs)
