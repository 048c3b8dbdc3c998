"""Image classification data: MNIST, CIFAR-10 and CIFAR-100 as in-memory uint8 tensors.

Layout read (``np.savez`` archives, the layout of ``shared/data``; see its README):

=====================================  =========================================================
``mnist/{train,test}.npz``             ``x`` uint8 ``(N, 28, 28)``, ``y`` int64 ``(N,)``
``cifar10/{train,test}.npz``           exact CIFAR-10 (written by :func:`download_cifar10`),
                                       ``x`` uint8 ``(N, 32, 32, 3)`` RGB HWC, ``y`` int64
``cifar10_jpeg_q75/{train,test}.npz``  the lossy JPEG copy of ``shared/data``, same arrays; used
                                       when ``cifar10/`` is absent (``ImageData.lossy`` is True)
``cifar100/{train,test}.npz``          CIFAR-100 (fine labels), same arrays
=====================================  =========================================================

The data folder is ``data_dir`` if given, else ``$DUALFLOW_DATA``, else the download cache
(``$DUALFLOW_CACHE`` or ``~/.cache/dualflow``, subfolder ``data``). Nothing here touches the
network except the explicit ``download_*`` functions (for machines with network access):
they fetch the official archives, check their published MD5 sums and convert them to the
layout above in the cache.

Images come back as uint8 tensors ``(N, C, H, W)`` (NCHW, values 0..255) together with the
per-channel mean and standard deviation of the *whole* training set (in units of [0, 1]
intensities), so batches are normalised on the fly with :meth:`ImageData.normalize`
(``(x / 255 - mean) / std``, float32), after uint8 augmentation. Keeping uint8 in memory
costs a quarter of float32 (CIFAR train: 150 MiB instead of 600 MiB).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "BatchLoader",
    "DatasetInfo",
    "ImageData",
    "ImageDataset",
    "default_cache_dir",
    "download_cifar10",
    "download_cifar100",
    "download_mnist",
    "iterate_batches",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_mnist",
    "resolve_data_dirs",
    "verify_checksums",
]

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset's arrays must look like.

    Attributes:
        name: registry name.
        folders: sub-folders tried in order (the first holding both files wins).
        image_shape: per-example shape of ``x`` in the files (HW or HWC).
        num_classes: labels lie in ``[0, num_classes)``.
        sizes: official ``(train, test)`` sizes (documentation; subsets are accepted).
        lossy_folders: folders whose pixels are not the original ones.
    """

    name: str
    folders: tuple[str, ...]
    image_shape: tuple[int, ...]
    num_classes: int
    sizes: tuple[int, int]
    lossy_folders: tuple[str, ...] = ()


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", ("mnist",), (28, 28), 10, (60000, 10000)),
    "cifar10": DatasetInfo(
        "cifar10",
        ("cifar10", "cifar10_jpeg_q75"),
        (32, 32, 3),
        10,
        (50000, 10000),
        lossy_folders=("cifar10_jpeg_q75",),
    ),
    "cifar100": DatasetInfo("cifar100", ("cifar100",), (32, 32, 3), 100, (50000, 10000)),
}


# ----------------------------------------------------------------------------- locations


def default_cache_dir() -> Path:
    """``$DUALFLOW_CACHE``, else ``$XDG_CACHE_HOME/dualflow``, else ``~/.cache/dualflow``."""
    env = os.environ.get("DUALFLOW_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dualflow"


def resolve_data_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Folders searched for data, in order: ``data_dir`` alone if given; otherwise
    ``$DUALFLOW_DATA`` (if set) and the download cache ``default_cache_dir() / "data"``."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    dirs = []
    env = os.environ.get("DUALFLOW_DATA")
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(default_cache_dir() / "data")
    return dirs


def _find(info: DatasetInfo, data_dir: str | os.PathLike[str] | None) -> tuple[Path, str]:
    dirs = resolve_data_dirs(data_dir)
    for d in dirs:
        for folder in info.folders:
            if (d / folder / "train.npz").is_file() and (d / folder / "test.npz").is_file():
                return d, folder
    tried = "\n".join(f"  {d / f}/{{train,test}}.npz" for d in dirs for f in info.folders)
    shape = "x uint8 (N, " + ", ".join(map(str, info.image_shape)) + "), y int64 (N,)"
    raise FileNotFoundError(
        f"{info.name} data not found. Looked for:\n{tried}\n"
        f"Put train.npz and test.npz ({shape}) in <data-dir>/{info.folders[0]}/ and pass "
        f"data_dir (--data-dir) or set DUALFLOW_DATA=<data-dir>; with network access, "
        f"dualflow.experiments.data.images.download_{info.name}() fills the cache folder "
        f"{default_cache_dir() / 'data'}."
    )


# ----------------------------------------------------------------------------- checksums


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksums(root: Path, files: Sequence[Path], sums_file: str = "SHA256SUMS") -> None:
    """Check ``files`` against ``root / sums_file`` (``sha256sum`` format; entries matched by
    their path relative to ``root``, with or without a leading ``data/`` as in ``shared/``).

    Raises:
        FileNotFoundError: no checksum file, or no entry for one of the files.
        ValueError: a checksum differs (the file is corrupted or was replaced).
    """
    sums_path = root / sums_file
    if not sums_path.is_file():
        raise FileNotFoundError(f"checksum verification requested but {sums_path} does not exist")
    table: dict[str, str] = {}
    for line in sums_path.read_text().splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2:
            table[parts[1].lstrip("*").strip()] = parts[0].lower()
    for f in files:
        rel = f.relative_to(root).as_posix()
        want = table.get(rel) or table.get(f"data/{rel}")
        if want is None:
            raise FileNotFoundError(f"{sums_path} has no entry for {rel}")
        got = _sha256(f)
        if got != want:
            raise ValueError(
                f"checksum mismatch for {f}: expected sha256 {want}, got {got} (corrupted file?)"
            )


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ImageData:
    """A loaded dataset: uint8 images ``(N, C, H, W)`` and int64 labels, train and test.

    Attributes:
        name: ``"mnist"``, ``"cifar10"`` or ``"cifar100"``.
        x_train, y_train, x_test, y_test: tensors (CPU).
        num_classes: number of classes.
        classes: class names (indices ``0..num_classes-1``), from ``classes.txt`` beside the
            arrays when present (written by the downloads), else the known CIFAR-10 names or
            the label numbers.
        mean, std: per-channel mean / standard deviation of the training pixels in [0, 1] units
            (over the full training set as loaded).
        source: folder the arrays came from.
        lossy: the pixels are not the original ones (the CIFAR-10 JPEG copy).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    lossy: bool = False

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])

    def normalize(self, x: Tensor) -> Tensor:
        """``(x / 255 - mean) / std`` as float32 for uint8 ``x``; floating ``x`` is taken to be in
        [0, 1] already (``(x - mean) / std``). Shape ``(B, C, H, W)``."""
        from dualflow.experiments.augment import normalize

        return normalize(x, self.mean, self.std)

    def limit_train(self, n: int | None) -> ImageData:
        """The first ``n`` training examples (``None``: all); normalisation statistics unchanged."""
        if n is None:
            return self
        if n < 1:
            raise ValueError(f"limit_train must be >= 1, got {n}")
        return replace(self, x_train=self.x_train[:n], y_train=self.y_train[:n])

    def split_validation(self, n_val: int) -> tuple[ImageData, tuple[Tensor, Tensor]]:
        """Hold out the *last* ``n_val`` training examples: ``(data without them, (x_val, y_val))``."""
        n = self.x_train.shape[0]
        if not 0 < n_val < n:
            raise ValueError(f"n_val must lie in (0, {n}), got {n_val}")
        rest = replace(self, x_train=self.x_train[: n - n_val], y_train=self.y_train[: n - n_val])
        return rest, (self.x_train[n - n_val :], self.y_train[n - n_val :])

    def __repr__(self) -> str:
        return (
            f"ImageData({self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
            f"classes={self.num_classes}, source={self.source!r}{', lossy' if self.lossy else ''})"
        )


def _read_npz(path: Path, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy array
            raise ValueError(f"{path}: a single .npy array, not an .npz archive holding arrays 'x' and 'y'")
        with z:
            missing = {"x", "y"} - set(z.files)
            if missing:
                raise ValueError(
                    f"{path}: missing array(s) {sorted(missing)} (found {z.files}); expected 'x' and 'y'"
                )
            x, y = z["x"], z["y"]
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        raise ValueError(
            f"{path}: cannot read the archive ({e}); the file is truncated, corrupted or not an .npz"
        ) from None
    except ValueError as e:
        if str(path) in str(e):
            raise
        # numpy's wording invites unpickling ("allow_pickle"); an image archive never needs it
        raise ValueError(
            f"{path}: not an .npz archive of plain arrays 'x' (uint8 images) and 'y' (int labels): it holds "
            "pickled or object data, or is corrupted; rewrite it with numpy.savez(path, x=..., y=...)"
        ) from None
    _check_arrays(x, y, info, path)
    return x, y


def _check_arrays(x: np.ndarray, y: np.ndarray, info: DatasetInfo, path: Path) -> None:
    shape = "(N, " + ", ".join(map(str, info.image_shape)) + ")"
    if x.dtype != np.uint8:
        raise ValueError(f"{path}: x must be uint8 images {shape}, got dtype {x.dtype}")
    if x.ndim != 1 + len(info.image_shape) or tuple(x.shape[1:]) != info.image_shape:
        raise ValueError(f"{path}: x must have shape {shape}, got {x.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: y must hold integer labels, got dtype {y.dtype}")
    if y.ndim != 1:
        raise ValueError(f"{path}: y must have shape (N,), got {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{path}: x and y differ in length ({x.shape[0]} vs {y.shape[0]})")
    if x.shape[0] == 0:
        raise ValueError(f"{path}: no examples")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= info.num_classes:
        raise ValueError(f"{path}: labels must lie in [0, {info.num_classes}), found range [{lo}, {hi}]")


def _to_nchw(x: np.ndarray) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.dim() == 3:
        return t.unsqueeze(1)
    return t.permute(0, 3, 1, 2).contiguous()


def _channel_stats(x: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``(N, C, H, W)`` images in [0, 1] units (exact sums
    in float64, chunked so that no float copy of the whole set is made)."""
    c = x.shape[1]
    s1 = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        b = x[i : i + chunk].to(torch.float64)
        s1 += b.sum(dim=(0, 2, 3))
        s2 += (b * b).sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp_min(0.0)
    return tuple((mean / 255.0).tolist()), tuple((var.sqrt() / 255.0).tolist())


_CACHE: dict[tuple[str, str, float, float], ImageData] = {}


def _load(
    info: DatasetInfo, data_dir: str | os.PathLike[str] | None, verify: bool, classes: tuple[str, ...]
) -> ImageData:
    root, folder = _find(info, data_dir)
    files = [root / folder / "train.npz", root / folder / "test.npz"]
    if verify:
        verify_checksums(root, files)
    key = (info.name, str(files[0].resolve()), files[0].stat().st_mtime, files[1].stat().st_mtime)
    if key in _CACHE:
        return _CACHE[key]
    xtr, ytr = _read_npz(files[0], info)
    xte, yte = _read_npz(files[1], info)
    x_train, x_test = _to_nchw(xtr), _to_nchw(xte)
    mean, std = _channel_stats(x_train)
    names_file = root / folder / "classes.txt"
    if names_file.is_file():
        try:
            text = names_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{names_file}: not a UTF-8 text file (one class name per line)") from None
        names = tuple(line.strip() for line in text.splitlines() if line.strip())
        if len(names) == info.num_classes:
            classes = names
    data = ImageData(
        name=info.name,
        x_train=x_train,
        y_train=torch.from_numpy(ytr.astype(np.int64)),
        x_test=x_test,
        y_test=torch.from_numpy(yte.astype(np.int64)),
        num_classes=info.num_classes,
        classes=classes or tuple(str(i) for i in range(info.num_classes)),
        mean=mean,
        std=std,
        source=str(root / folder),
        lossy=folder in info.lossy_folders,
    )
    while len(_CACHE) >= 2:  # keep at most two datasets in memory
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = data
    return data


def load_mnist(data_dir: str | os.PathLike[str] | None = None, *, verify: bool = False) -> ImageData:
    """MNIST: 60000 + 10000 images ``(N, 1, 28, 28)`` uint8, labels 0..9.

    Args:
        data_dir: folder holding ``mnist/{train,test}.npz`` (default: ``$DUALFLOW_DATA``, then
            the download cache).
        verify: check the files against ``<data_dir>/SHA256SUMS``.
    """
    return _load(DATASETS["mnist"], data_dir, verify, tuple(str(i) for i in range(10)))


def load_cifar10(data_dir: str | os.PathLike[str] | None = None, *, verify: bool = False) -> ImageData:
    """CIFAR-10: 50000 + 10000 images ``(N, 3, 32, 32)`` uint8, labels 0..9.

    Reads ``cifar10/`` (exact pixels) if present, else ``cifar10_jpeg_q75/`` (the lossy JPEG
    copy; ``ImageData.lossy`` is then True: report results as "CIFAR-10 (JPEG q75 copy)").
    """
    return _load(DATASETS["cifar10"], data_dir, verify, CIFAR10_CLASSES)


def load_cifar100(data_dir: str | os.PathLike[str] | None = None, *, verify: bool = False) -> ImageData:
    """CIFAR-100 (fine labels 0..99): ``cifar100/{train,test}.npz`` in the CIFAR-10 layout."""
    return _load(DATASETS["cifar100"], data_dir, verify, ())


_LOADERS: dict[str, Callable[..., ImageData]] = {
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
}


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, verify: bool = False
) -> ImageData:
    """Load ``name`` (``"mnist"``, ``"cifar10"``, ``"cifar100"``)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(_LOADERS))}")
    return _LOADERS[name](data_dir, verify=verify)


# ----------------------------------------------------------------------------- batches


class ImageDataset(torch.utils.data.Dataset):
    """In-memory ``(x, y)`` with a *batched* transform, for ``torch.utils.data.DataLoader`` and
    :func:`dualflow.train.fit`.

    It implements ``__getitems__``, so a ``DataLoader`` (and hence ``fit``) fetches a whole
    batch with one indexing and one vectorised ``transform`` call (e.g.
    :func:`dualflow.experiments.augment.train_transform`) instead of one call per image.
    ``transform`` maps a uint8 batch ``(B, C, H, W)`` to the model input; default:
    ``x.float() / 255``. Randomness comes from torch's global generator (seeded and
    checkpointed by ``fit``).
    """

    def __init__(self, x: Tensor, y: Tensor, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y differ in length: {x.shape[0]} vs {y.shape[0]}")
        self.x, self.y = x, y
        self.transform = transform if transform is not None else _to_unit

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.x[i : i + 1])[0], self.y[i]

    def __getitems__(self, idx: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        ii = torch.as_tensor(idx, dtype=torch.long)
        xb = self.transform(self.x[ii])
        return list(zip(xb.unbind(0), self.y[ii].unbind(0)))


def _to_unit(x: Tensor) -> Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def iterate_batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    transform: Callable[[Tensor], Tensor] | None = None,
    device: str | torch.device | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(transform(x[idx]), y[idx])`` mini-batches from in-memory tensors (no workers,
    no per-image Python work). Without ``transform`` the images are yielded as stored."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = int(y.shape[0])
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        xb, yb = x[idx], y[idx]
        if device is not None:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        if transform is not None:
            xb = transform(xb)
        yield xb, yb


class BatchLoader:
    """Epoch-wise shuffled mini-batches of in-memory tensors, deterministic given ``(seed, epoch)``.

    ``len(loader)`` is the number of batches per epoch; each ``iter(loader)`` runs one epoch
    and advances the epoch counter (``set_epoch`` sets it, e.g. when resuming). With
    ``num_replicas > 1`` (distributed data parallel) every replica gets a disjoint shard of
    the same permutation, padded by wrapping around to equal length (as
    ``torch.utils.data.DistributedSampler``). The transform runs on ``device`` after the
    uint8 batch is moved there, so augmentation happens on the GPU when there is one.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        transform: Callable[[Tensor], Tensor] | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y differ in length: {x.shape[0]} vs {y.shape[0]}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.drop_last = int(batch_size), shuffle, drop_last
        self.transform, self.seed, self.device = transform, int(seed), device
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self, epoch: int) -> Tensor:
        n = int(self.y.shape[0])
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.num_replicas > 1:
            total = math.ceil(n / self.num_replicas) * self.num_replicas
            if total > n:
                order = torch.cat([order, order[: total - n]])
            order = order[self.rank :: self.num_replicas]
        return order

    def __len__(self) -> int:
        n = int(self.y.shape[0])
        per = math.ceil(n / self.num_replicas) if self.num_replicas > 1 else n
        return per // self.batch_size if self.drop_last else math.ceil(per / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self._indices(self.epoch)
        self.epoch += 1
        stop = len(self) * self.batch_size
        for i in range(0, min(stop, order.shape[0]), self.batch_size):
            idx = order[i : i + self.batch_size]
            xb, yb = self.x[idx], self.y[idx]
            if self.device is not None:
                xb = xb.to(self.device, non_blocking=True)
                yb = yb.to(self.device, non_blocking=True)
            if self.transform is not None:
                xb = self.transform(xb)
            yield xb, yb


# ----------------------------------------------------------------------------- downloads

#: Official archives and their published MD5 sums (the values torchvision checks as well).
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(urls: Sequence[str], dest: Path, md5: str, timeout: float = 60.0) -> Path:
    """Download the first working URL to ``dest`` (atomically) and check its MD5."""
    if dest.is_file() and _md5(dest) == md5:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        tmp = dest.with_suffix(dest.suffix + ".part")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
        except OSError as e:
            errors.append(f"{url}: {e}")
            tmp.unlink(missing_ok=True)
            continue
        got = _md5(tmp)
        if got != md5:
            tmp.unlink(missing_ok=True)
            errors.append(f"{url}: MD5 {got} != expected {md5}")
            continue
        os.replace(tmp, dest)
        return dest
    raise OSError(f"could not download {dest.name}:\n  " + "\n  ".join(errors))


def _save_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    os.close(fd)
    np.savez_compressed(tmp, x=x, y=y.astype(np.int64))
    os.replace(tmp, path)


def _read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file (MNIST format): big-endian header, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if arr.size != math.prod(dims):
        raise ValueError(f"{path}: IDX header says {dims}, found {arr.size} values")
    return arr.reshape(dims)


def mnist_from_idx(folder: Path, out_dir: Path) -> None:
    """Convert the four official MNIST IDX files in ``folder`` to ``out_dir/{train,test}.npz``."""
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
        y = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        _check_arrays(x, y, DATASETS["mnist"], folder / prefix)
        _save_npz(out_dir / f"{split}.npz", x, y)


def cifar_from_tar(tar_path: Path, out_dir: Path, kind: str) -> tuple[str, ...]:
    """Convert the official CIFAR python archive (``kind`` ``"cifar10"`` or ``"cifar100"``) to
    ``out_dir/{train,test}.npz`` (``x`` uint8 ``(N, 32, 32, 3)`` HWC, ``y`` int64); returns the
    class names. CIFAR-100 uses the 100 fine labels."""
    if kind == "cifar10":
        splits = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        label_key, meta_name, names_key = b"labels", "batches.meta", b"label_names"
    elif kind == "cifar100":
        splits = {"train": ["train"], "test": ["test"]}
        label_key, meta_name, names_key = b"fine_labels", "meta", b"fine_label_names"
    else:
        raise ValueError(f"kind must be 'cifar10' or 'cifar100', got {kind!r}")

    with tarfile.open(tar_path, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

        def read(name: str) -> dict:
            if name not in members:
                raise ValueError(f"{tar_path}: member {name!r} missing")
            f = tar.extractfile(members[name])
            assert f is not None
            # The official archives are pickles of dicts of numpy arrays and lists; they come
            # from a checksum-verified download.
            return pickle.load(f, encoding="bytes")

        for split, names in splits.items():
            xs, ys = [], []
            for name in names:
                d = read(name)
                xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                ys.append(np.asarray(d[label_key], dtype=np.int64))
            x, y = np.concatenate(xs), np.concatenate(ys)
            _check_arrays(x, y, DATASETS[kind], tar_path)
            _save_npz(out_dir / f"{split}.npz", np.ascontiguousarray(x), y)
        meta = read(meta_name)
        classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key])
    (out_dir / "classes.txt").write_text("\n".join(classes) + "\n")
    return classes


def download_mnist(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download MNIST (official IDX archives, MD5-checked) and write ``<cache>/data/mnist/``.
    Returns the data folder to pass as ``data_dir``. Needs network access."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    raw = cache / "raw" / "mnist"
    for name, md5 in MNIST_FILES.items():
        _fetch([m + name for m in MNIST_MIRRORS], raw / name, md5)
    mnist_from_idx(raw, cache / "data" / "mnist")
    return cache / "data"


def download_cifar10(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download CIFAR-10 (python archive, MD5-checked) and write ``<cache>/data/cifar10/``
    (exact pixels; preferred over the JPEG copy by :func:`load_cifar10`). Needs network access."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tar = _fetch([CIFAR10_URL], cache / "raw" / "cifar-10-python.tar.gz", CIFAR10_MD5)
    cifar_from_tar(tar, cache / "data" / "cifar10", "cifar10")
    return cache / "data"


def download_cifar100(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download CIFAR-100 (python archive, MD5-checked) and write ``<cache>/data/cifar100/``.
    Needs network access."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tar = _fetch([CIFAR100_URL], cache / "raw" / "cifar-100-python.tar.gz", CIFAR100_MD5)
    cifar_from_tar(tar, cache / "data" / "cifar100", "cifar100")
    return cache / "data"
