"""`sklearn_digits`: scikit-learn's handwritten digits as a local TFDS dataset.

The ViT example's offline default. The 1,797 images (8x8, 16 grey levels, from the
UCI "Optical Recognition of Handwritten Digits" set) ship inside scikit-learn, so
the dataset builds on a fresh machine without a network. Pixels are rescaled from
0..16 to 0..255 so the images look like every other TFDS image dataset (mnist,
cifar10), and split once, stratified by label with a fixed seed, into 1,437
training and 360 test images.

    import examples.datasets.digits  # registers the builder with TFDS
    train = tfds.load("sklearn_digits", split="train", as_supervised=True)
"""

import numpy as np
import tensorflow_datasets as tfds

NAME = "sklearn_digits"
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def split_indices(labels, test_fraction=TEST_FRACTION, seed=SPLIT_SEED):
    """Stratified train/test split of example indices: the same on every machine.

    Returns:
        ``(train, test)``, two sorted int arrays that partition ``range(len(labels))``.
    """
    rng = np.random.default_rng(seed)
    test = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(len(members) * test_fraction))
        test.extend(rng.choice(members, size=count, replace=False))
    test = np.sort(np.asarray(test, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stratified 80/20 split with seed 0; pixels scaled to 0..255."}

    def _info(self):
        return self.dataset_info_from_configs(
            description=(
                "The 1,797 8x8 grey-level images of handwritten digits shipped with "
                "scikit-learn (UCI Optical Recognition of Handwritten Digits, test part)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data is inside scikit-learn.
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        labels = digits.target.astype(np.int64)
        train, test = split_indices(labels)
        return {
            "train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test),
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i])}
