"""Data sets of the experiments (never imported by the ``dualflow`` library itself).

Submodules: :mod:`~dualflow.experiments.data.images` (MNIST, CIFAR-10/100: loading from the
``shared/data`` layout, checksums, downloads, in-memory batch iteration) and the UCI
regression sets (:mod:`~dualflow.experiments.data.uci`, where present). The image API is
re-exported here.
"""

from dualflow.experiments.data.images import (
    DATASETS,
    BatchLoader,
    ImageData,
    ImageDataset,
    download_cifar10,
    download_cifar100,
    download_mnist,
    iterate_batches,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_mnist,
    resolve_data_dirs,
)

__all__ = [
    "DATASETS",
    "BatchLoader",
    "ImageData",
    "ImageDataset",
    "download_cifar10",
    "download_cifar100",
    "download_mnist",
    "iterate_batches",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_mnist",
    "resolve_data_dirs",
]
