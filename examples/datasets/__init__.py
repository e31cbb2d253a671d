"""Datasets of the examples: loading by TFDS name, with local builders for offline use.

`load(name, split, data_dir=None, download=True)` is what every example calls.
`name` is a TFDS catalog name (``"tiny_shakespeare"``, ``"imdb_reviews"``,
``"mnist"``, ...) or one of the embedded datasets registered in `EMBEDDED`,
which TFDS builds locally from data already on the machine (no network).

Errors (all `DatasetError`, a `ValueError`):
    - an unknown name (lists the names the example accepts),
    - a `data_dir` without the data when it cannot be downloaded (names the
      directory and says how to get the data).

Part 2 (BERT/ViT) adds its own embedded builders by calling
`register_embedded("name", "module.path:ClassName")`.
"""

import importlib
import os

DEFAULT_DATA_DIR = os.path.join("~", "tensorflow_datasets")

# name -> "module:Class" of a local TFDS builder; imported only when used.
EMBEDDED = {"pydoc_text": "examples.datasets.pydoc_text:PydocText"}


class DatasetError(ValueError):
    """A dataset name or data directory the example cannot use."""


def register_embedded(name, target):
    """Declare a local TFDS builder (``"module:Class"``) as embedded dataset `name`."""
    EMBEDDED[name] = target


def embedded_builder_class(name):
    """The builder class of embedded dataset `name` (importing it registers it with TFDS)."""
    module_name, class_name = EMBEDDED[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def resolve_data_dir(data_dir):
    """`data_dir` with ``~`` expanded, or the TFDS default (``~/tensorflow_datasets``)."""
    return os.path.abspath(os.path.expanduser(data_dir or DEFAULT_DATA_DIR))


def check_name(name, allowed):
    """Raise `DatasetError` unless `name` is in `allowed` (the example's datasets)."""
    if name not in allowed:
        raise DatasetError(
            f"Unknown dataset {name!r}. This example trains on: "
            f"{', '.join(repr(n) for n in allowed)}. Received: dataset={name!r}"
        )


def load(name, split, data_dir=None, download=True, allowed=None, **kwargs):
    """Load split `split` of dataset `name` as a `tf.data.Dataset` of feature dicts.

    Args:
        name: TFDS catalog name or an embedded dataset name (see `EMBEDDED`).
        split: TFDS split spec, e.g. ``"train"`` or ``"test[:10%]"``.
        data_dir: Where TFDS keeps prepared data; ``None`` for ``~/tensorflow_datasets``.
        download: Whether a catalog dataset missing from `data_dir` may be
            downloaded. Embedded datasets are always built locally.
        allowed: Names the calling example accepts; others raise `DatasetError`.
        **kwargs: Passed to `tfds.load` (e.g. ``shuffle_files``, ``as_supervised``).

    Raises:
        DatasetError: unknown name, or no data in `data_dir` and no way to get it.
    """
    import tensorflow_datasets as tfds

    if allowed is not None:
        check_name(name, allowed)
    data_dir = resolve_data_dir(data_dir)
    if name in EMBEDDED:
        embedded_builder_class(name)
        download = True  # "download" of an embedded dataset reads local files only
    try:
        return tfds.load(name, split=split, data_dir=data_dir, download=download, **kwargs)
    except DatasetError:
        raise
    except Exception as e:  # TFDS raises many kinds; all mean "no data here"
        if "not found" in str(e).lower() and "dataset" in str(e).lower() and name not in EMBEDDED:
            if allowed is None:
                raise DatasetError(f"Unknown dataset {name!r}: {e}") from e
        how = (
            "it could not be downloaded (no network?)"
            if download
            else "downloading is off (--no-download)"
        )
        raise DatasetError(
            f"No data for dataset {name!r} in data_dir={data_dir!r}, and {how}. "
            f"Prepare it there with network access "
            f"(`tfds build {name} --data_dir {data_dir}`), point --data-dir at a "
            f"directory that holds it, or use an embedded dataset "
            f"({', '.join(sorted(EMBEDDED))}). Cause: {type(e).__name__}: {e}"
        ) from e
