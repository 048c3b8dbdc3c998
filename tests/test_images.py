"""Image data (MNIST, CIFAR-10) and batched augmentation."""

import gzip
import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dualflow as df
from dualflow.experiments import augment as A
from dualflow.experiments.data import images as I

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _data_dir() -> Path:
    """As conftest.data_dir: $DUALFLOW_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("DUALFLOW_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def mnist():
    return I.load_mnist(_data_dir())


@pytest.fixture(scope="module")
def cifar10():
    return I.load_cifar10(_data_dir())


def _write_npz(path, x, y):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y)


def _fake_mnist(root, n=20, **over):
    x = over.get("x", np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8))
    y = over.get("y", np.arange(n) % 10)
    _write_npz(root / "mnist" / "train.npz", x, y)
    _write_npz(root / "mnist" / "test.npz", x[:10], y[:10])
    return root


# ----------------------------------------------------------------------------- real data


def test_mnist_shapes_counts_and_stats(mnist, data_root):
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.x_train.dtype == torch.uint8
    assert mnist.x_test.shape == (10000, 1, 28, 28)
    assert mnist.y_train.dtype == torch.int64
    assert torch.bincount(mnist.y_train).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(mnist.y_test).tolist() == MNIST_TEST_COUNTS
    assert mnist.mean[0] * 255 == pytest.approx(33.318, abs=1e-3)  # the README's mean pixel
    assert not mnist.lossy and mnist.in_channels == 1 and mnist.image_size == 28
    xb = mnist.normalize(mnist.x_train[:1000])
    assert xb.dtype == torch.float32
    assert float(xb.mean()) == pytest.approx(0.0, abs=0.05) and float(xb.std()) == pytest.approx(
        1.0, abs=0.05
    )
    I.load_mnist(data_root, verify=True)  # SHA256SUMS of shared/data


def test_cifar10_shapes_counts_order(cifar10):
    assert cifar10.x_train.shape == (50000, 3, 32, 32) and cifar10.x_train.dtype == torch.uint8
    assert cifar10.x_test.shape == (10000, 3, 32, 32)
    assert torch.bincount(cifar10.y_train).tolist() == [5000] * 10
    assert torch.bincount(cifar10.y_test).tolist() == [1000] * 10
    assert cifar10.y_train[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert cifar10.y_test[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert [round(m * 255, 2) for m in cifar10.mean] == pytest.approx([125.27, 122.93, 113.86], abs=0.02)
    assert cifar10.lossy and cifar10.source.endswith("cifar10_jpeg_q75")
    assert cifar10.classes[0] == "airplane" and cifar10.classes[9] == "truck"
    small = cifar10.limit_train(100)
    assert small.x_train.shape[0] == 100 and small.mean == cifar10.mean


def test_cifar100_missing_gives_clear_error(data_root):
    with pytest.raises(FileNotFoundError, match=r"(?s)cifar100 data not found.*cifar100/.*DUALFLOW_DATA"):
        I.load_cifar100(data_root)
    with pytest.raises(ValueError, match="unknown dataset"):
        I.load_dataset("svhn", data_root)


# ----------------------------------------------------------------------------- errors


def test_missing_data_names_locations(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALFLOW_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("DUALFLOW_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as e:
        I.load_mnist()
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "mnist") in msg and str(tmp_path / "cache" / "data" / "mnist") in msg
    assert "DUALFLOW_DATA" in msg and "download_mnist" in msg


def test_data_dir_from_environment(tmp_path, monkeypatch):
    _fake_mnist(tmp_path)
    monkeypatch.setenv("DUALFLOW_DATA", str(tmp_path))
    d = I.load_dataset("mnist")
    assert d.x_train.shape == (20, 1, 28, 28) and d.source == str(tmp_path / "mnist")


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"x": np.zeros((20, 28, 28), np.float32)}, "must be uint8"),
        ({"x": np.zeros((20, 32, 32), np.uint8)}, r"shape \(N, 28, 28\)"),
        ({"y": np.arange(20) % 10 + 5}, r"labels must lie in \[0, 10\)"),
        ({"y": np.zeros(19, np.int64)}, "differ in length"),
        ({"y": np.zeros(20, np.float64)}, "integer labels"),
    ],
)
def test_corrupted_arrays_are_rejected(tmp_path, over, match):
    _fake_mnist(tmp_path, **over)
    with pytest.raises(ValueError, match=match):
        I.load_mnist(tmp_path)


def test_unreadable_or_incomplete_archives(tmp_path):
    _fake_mnist(tmp_path)
    np.savez(tmp_path / "mnist" / "train.npz", images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="missing array"):
        I.load_mnist(tmp_path)
    (tmp_path / "mnist" / "train.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="corrupted"):
        I.load_mnist(tmp_path)


def test_checksum_verification(tmp_path):
    _fake_mnist(tmp_path)
    files = ["mnist/train.npz", "mnist/test.npz"]
    sums = {f: hashlib.sha256((tmp_path / f).read_bytes()).hexdigest() for f in files}
    (tmp_path / "SHA256SUMS").write_text("".join(f"{h}  data/{f}\n" for f, h in sums.items()))
    I.load_mnist(tmp_path, verify=True)
    (tmp_path / "SHA256SUMS").write_text("".join(f"{'0' * 64}  {f}\n" for f in files))
    with pytest.raises(ValueError, match="checksum mismatch"):
        I.load_mnist(tmp_path, verify=True)
    (tmp_path / "SHA256SUMS").unlink()
    with pytest.raises(FileNotFoundError, match="SHA256SUMS"):
        I.load_mnist(tmp_path, verify=True)


# ----------------------------------------------------------------------------- downloads (offline)


def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return gzip.compress(header + arr.astype(np.uint8).tobytes())


def test_download_mnist_from_local_mirror(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    src = tmp_path / "mirror"
    src.mkdir()
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(12) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (5, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.arange(5),
    }
    md5 = {}
    for name, arr in arrays.items():
        (src / name).write_bytes(_idx(arr))
        md5[name] = hashlib.md5((src / name).read_bytes()).hexdigest()
    monkeypatch.setattr(I, "MNIST_MIRRORS", ("file:///nonexistent/", src.as_uri() + "/"))
    monkeypatch.setattr(I, "MNIST_FILES", md5)
    root = I.download_mnist(tmp_path / "cache")
    d = I.load_mnist(root)
    assert d.x_train.shape == (12, 1, 28, 28)
    assert np.array_equal(d.x_train[:, 0].numpy(), arrays["train-images-idx3-ubyte.gz"])
    assert d.y_test.tolist() == [0, 1, 2, 3, 4]
    # a wrong checksum is refused
    monkeypatch.setattr(I, "MNIST_FILES", {**md5, "t10k-labels-idx1-ubyte.gz": "0" * 32})
    with pytest.raises(OSError, match="MD5"):
        I.download_mnist(tmp_path / "cache2")


def _pickle_member(tar, name, obj):
    data = pickle.dumps(obj)
    info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_cifar_archive_conversion(tmp_path):
    rng = np.random.default_rng(0)
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    batches = {}
    with tarfile.open(tar_path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            b = {
                b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                b"labels": list(rng.integers(0, 10, 4)),
            }
            batches[name] = b
            _pickle_member(tar, name, b)
        _pickle_member(tar, "batches.meta", {b"label_names": [n.encode() for n in I.CIFAR10_CLASSES]})
    out = tmp_path / "data" / "cifar10"
    assert I.cifar_from_tar(tar_path, out, "cifar10") == I.CIFAR10_CLASSES
    d = I.load_cifar10(tmp_path / "data")
    assert d.x_train.shape == (20, 3, 32, 32) and not d.lossy
    # CHW row of the pickle == our NCHW image
    assert np.array_equal(d.x_train[0].numpy().reshape(-1), batches["data_batch_1"][b"data"][0])
    assert d.y_test.tolist() == [int(v) for v in batches["test_batch"][b"labels"]]


# ----------------------------------------------------------------------------- augmentation


def test_crop_flip_is_a_shift_or_mirror_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)  # no zeros: padding is visible
    out = A.random_crop_flip(x, padding=2, generator=g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(16):  # each output is exactly one window (or its mirror) of the padded input
        hits = [
            (dy, dx, f)
            for dy in range(5)
            for dx in range(5)
            for f in (False, True)
            if torch.equal(out[i], (lambda w: w.flip(-1) if f else w)(padded[i, :, dy : dy + 8, dx : dx + 8]))
        ]
        assert hits, i
        flips += hits[0][2]
    assert 0 < flips < 16
    # values only move (plus zero padding); floats work the same
    assert set(out.unique().tolist()) <= set(x.unique().tolist()) | {0}
    xf = torch.rand(4, 3, 8, 8)
    of = A.random_crop_flip(xf, padding=0, generator=g)
    assert all(torch.equal(of[i], xf[i]) or torch.equal(of[i], xf[i].flip(-1)) for i in range(4))


def test_crop_flip_deterministic_with_generator():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = A.random_crop_flip(x, generator=torch.Generator().manual_seed(3))
    b = A.random_crop_flip(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_mixup_keeps_labels_and_range():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 4, 4), torch.arange(8) % 10
    xm, t = A.mixup(x, y, alpha=0.4, generator=g)
    assert xm.shape == x.shape and 0.0 <= t.lam <= 1.0
    assert torch.equal(t.y_a, y) and sorted(t.y_b.tolist()) == sorted(y.tolist())
    assert float(xm.min()) >= float(x.min()) - 1e-6 and float(xm.max()) <= float(x.max()) + 1e-6
    soft = t.soft(10)
    torch.testing.assert_close(soft.sum(1), torch.ones(8))


def test_cutmix_pastes_one_box_and_lam_is_its_share():
    g = torch.Generator().manual_seed(1)
    x = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 3, 16, 16).contiguous()
    y = torch.arange(8)
    xm, t = A.cutmix(x, y, alpha=1.0, generator=g)
    assert xm.dtype == torch.uint8 and torch.equal(t.y_a, y)
    for i in range(8):
        own = (xm[i] == i).float().mean().item()
        other = (xm[i] == int(t.y_b[i])).float().mean().item()
        if int(t.y_b[i]) != i:
            assert own == pytest.approx(t.lam) and own + other == pytest.approx(1.0)


def test_mixed_loss_equals_soft_target_cross_entropy():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, 4, 4), torch.randint(0, 5, (6,))
    _, t = A.mixup(x, y, alpha=1.0, generator=g)
    logits = torch.randn(6, 5)
    soft = -(t.soft(5) * F.log_softmax(logits, -1)).sum(1).mean()
    torch.testing.assert_close(t.loss(df.losses.categorical_nll, logits), soft)
    mix = A.MixAugment(mixup_alpha=0.2, cutmix_alpha=1.0, generator=g)
    for _ in range(4):
        xm, tt = mix(x, y)
        assert xm.shape == x.shape and torch.equal(tt.y_a, y)
    assert A.MixAugment()(x, y)[1].lam == 1.0


def test_transforms_and_bad_inputs():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    tr = A.train_transform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), generator=torch.Generator().manual_seed(0))
    out = tr(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert float(out.min()) >= -2.0 - 1e-6 and float(out.max()) <= 2.0 + 1e-6
    ev = A.eval_transform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(x)
    torch.testing.assert_close(ev, (x.float() / 255 - 0.5) / 0.25)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        A.random_crop_flip(x[0])
    with pytest.raises(TypeError, match="floating-point"):
        A.mixup(x, torch.arange(4))
    with pytest.raises(ValueError, match="labels must have shape"):
        A.cutmix(x, torch.arange(3))
    with pytest.raises(ValueError, match="channels"):
        A.normalize(x, (0.5,), (0.2,))
    with pytest.raises(ValueError, match="padding"):
        A.random_crop_flip(x, padding=-1)


def test_randaugment_with_kornia():
    pytest.importorskip("kornia")
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    out = A.randaugment(x, n=2, m=9)
    assert out.shape == x.shape and out.dtype == torch.uint8


# ----------------------------------------------------------------------------- batches


def test_batch_loader_epochs_shards_and_determinism():
    x, y = torch.arange(10).view(10, 1, 1, 1), torch.arange(10)
    bl = I.BatchLoader(x, y, 4, seed=1)
    e0 = torch.cat([yb for _, yb in bl])
    e1 = torch.cat([yb for _, yb in bl])
    assert sorted(e0.tolist()) == list(range(10)) and not torch.equal(e0, e1) and len(bl) == 3
    bl.set_epoch(0)
    assert torch.equal(torch.cat([yb for _, yb in bl]), e0)
    shards = [
        torch.cat([yb for _, yb in I.BatchLoader(x, y, 2, seed=1, num_replicas=3, rank=r)]) for r in range(3)
    ]
    assert all(len(s) == 4 for s in shards) and set(torch.cat(shards).tolist()) == set(range(10))
    assert len(I.BatchLoader(x, y, 4, drop_last=True)) == 2
    batches = list(I.iterate_batches(x, y, 3, drop_last=True))
    assert [len(b[1]) for b in batches] == [3, 3, 3]


def test_image_dataset_with_fit(mnist):
    from dualflow import models

    torch.manual_seed(0)
    tr = A.train_transform(mnist.mean, mnist.std, crop_padding=2, flip=False)
    ds = I.ImageDataset(mnist.x_train[:64], mnist.y_train[:64], tr)
    xb, yb = ds.__getitems__([0, 5, 7])[1]
    assert xb.shape == (1, 28, 28) and xb.dtype == torch.float32 and int(yb) == int(mnist.y_train[5])
    model = models.create("mlp", in_channels=1, width=32, depth=1)
    cfg = df.train.TrainConfig(epochs=1, batch_size=32, lr=1e-2, progress=False)
    hist = df.train.fit(model, df.losses.categorical_nll, ds, cfg)
    assert len(hist) == 1 and np.isfinite(hist["loss"][0])
