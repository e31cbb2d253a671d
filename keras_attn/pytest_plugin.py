"""keras_attn's pytest plugin: the fixtures of `keras_attn.testing`.

Loaded by pytest at start-up (entry point ``pytest11``), so it imports nothing
heavy: Keras and keras_attn's checks load when a fixture is first used, after the
plugin author's ``conftest.py`` has had its chance to set ``KERAS_BACKEND``.
"""

import contextlib

import pytest


@pytest.fixture
def keras_attn_check():
    """The keras_attn interface checks: ``keras_attn_check(MyNormalizer)``."""
    from keras_attn import testing

    return testing.Checker()


@pytest.fixture
def keras_attn_tmp_plugin():
    """Register components for this test: ``keras_attn_tmp_plugin(MyScore, ...)``.

    Takes component classes (or a plugin object with hookimpls) and an optional
    ``name=``; everything registered is unregistered when the test ends.
    """
    from keras_attn import testing

    with contextlib.ExitStack() as stack:

        def register(*items, name=None, **by_kind):
            return stack.enter_context(testing.registered(*items, name=name, **by_kind))

        yield register
