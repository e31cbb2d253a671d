"""ViT's data: labelled images as batches, augmented with small shifts (and flips).

``sklearn_digits`` (the default) is built locally from scikit-learn's digits;
``mnist`` and ``cifar10`` come from the TFDS catalog.
"""

import numpy as np

from examples import datasets
from examples.common.training import Data
from examples.vit.model import check_image

DATASETS = ("sklearn_digits", "mnist", "cifar10")
PATCH_SIZES = {"sklearn_digits": 2, "mnist": 4, "cifar10": 4}
FLIPS = ("cifar10",)  # mirrored digits are other symbols; mirrored animals are animals

datasets.register_embedded("sklearn_digits", "examples.datasets.digits:SklearnDigits")


def load_images(args, split):
    """``(images uint8 (N, H, W, C), labels int32 (N,))`` of one split of ``args.dataset``."""
    ds = datasets.load(
        args.dataset,
        split,
        data_dir=args.data_dir,
        download=args.download,
        allowed=DATASETS,
        as_supervised=True,
    )
    images, labels = [], []
    for image, label in ds.as_numpy_iterator():
        images.append(image)
        labels.append(label)
    if not images:
        raise datasets.DatasetError(f"Split {split!r} of {args.dataset!r} is empty.")
    return np.stack(images), np.asarray(labels, dtype="int32")


def image_dataset(
    images, labels, batch_size, shuffle=True, seed=0, augment=False, flip=False, repeat=False
):
    """Batches of ``(images float32, labels)``; with `augment`, random shifts of up to
    1/8 of the side (at least one pixel) and, with `flip`, horizontal mirroring."""
    import tensorflow as tf

    height, width = images.shape[1:3]
    pad = max(1, height // 8)

    def shift(image, label):
        image = tf.cast(image, "float32")
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.random_crop(image, (height, width, images.shape[3]), seed=seed)
        if flip:
            image = tf.image.random_flip_left_right(image, seed=seed)
        return image, label

    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if augment:
        ds = ds.map(shift, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda image, label: (tf.cast(image, "float32"), label))
    return ds.batch(batch_size, drop_remainder=shuffle).prefetch(2)


class ImageData(Data):
    """The train and test images of ``args.dataset``; validated every epoch.

    Attributes:
        train, test: ``(images uint8 (N, H, W, C), labels int32 (N,))``.
        facts: Image shape, classes, sizes and the patch size (``--patch-size``,
            else the dataset's default).
    """

    validate = True

    def __init__(self, args):
        self.batch_size, self.augment = args.batch_size, args.augment
        self.flip = args.dataset in FLIPS
        self.train, self.test = load_images(args, "train"), load_images(args, "test")
        (x_train, y_train), (_, y_test) = self.train, self.test
        patch_size = args.patch_size or PATCH_SIZES.get(args.dataset, 4)
        check_image(x_train.shape[1:], patch_size)
        self.facts = {
            "image_shape": list(x_train.shape[1:]),
            "num_classes": int(max(y_train.max(), y_test.max())) + 1,
            "train_examples": len(y_train),
            "test_examples": len(y_test),
            "patch_size": patch_size,
        }

    def train_dataset(self, seed, repeat):
        return image_dataset(
            *self.train,
            self.batch_size,
            seed=seed,
            augment=self.augment,
            flip=self.flip,
            repeat=repeat,
        )

    def test_dataset(self):
        return image_dataset(*self.test, self.batch_size, shuffle=False)

    def steps_per_epoch(self):
        return len(self.train[1]) // self.batch_size

    def num_patches(self):
        height, width = self.facts["image_shape"][:2]
        return (height // self.facts["patch_size"]) * (width // self.facts["patch_size"])
