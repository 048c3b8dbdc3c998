"""Corrupt data files give a ``ValueError`` that names the file and says what is wrong.

numpy's own messages name neither the file nor, for ragged rows, the problem ("use `usecols`
to select a subset"), and for a damaged ``.npz`` they suggest loading it "unsafely with
allow_pickle"; none of that may reach the user.
"""

import io
import pickle
import shutil

import numpy as np
import pytest

from conftest import data_dir
from dualflow.experiments.data import images
from dualflow.experiments.data.uci import load_uci

NUMPY_WORDING = ("usecols", "allow_pickle", "pickle.load", "unsafely")


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture
def yacht(tmp_path):
    """A private copy of the yacht folder (standard layout) to damage."""
    src = data_dir() / "uci" / "yacht"
    if not src.is_dir():
        pytest.fail(f"benchmark data not found at {src}: set DUALFLOW_DATA")
    dst = tmp_path / "uci" / "yacht"
    shutil.copytree(src, dst)
    return dst


def _ragged(b: bytes) -> bytes:
    lines = b.split(b"\n")
    return b"\n".join([lines[0], b"1 2 3", *lines[1:]])


UCI_CASES = {
    "ragged rows": ("data.txt", _ragged, r"data row 2 has 3 column\(s\), the rows before it 7"),
    "text in data": ("data.txt", lambda b: b"abc def\n" + b, r"'abc' is not a number \(data row 1"),
    "empty data": ("data.txt", lambda b: b"", "the file is empty"),
    "binary data": ("data.txt", lambda b: bytes(range(256)), "not a text file"),
    "bad feature index": ("index_features.txt", lambda b: b"a b", "'a' is not an integer"),
    "float target index": ("index_target.txt", lambda b: b"1.5", "'1.5' is not an integer"),
    "target out of range": ("index_target.txt", lambda b: b"99", "column 99 out of range"),
    "two integers": ("n_hidden.txt", lambda b: b"50 60", "one integer expected, found 2 values"),
    "splits not npz": ("splits.npz", lambda b: b"hello world", "not an .npz archive of integer arrays"),
    "splits truncated": ("splits.npz", lambda b: b[: len(b) // 2], "truncated or corrupted"),
    "splits empty": ("splits.npz", lambda b: b"", "truncated or corrupted"),
    "splits pickled": ("splits.npz", lambda b: pickle.dumps({"train": 1}), "pickled or object data"),
    "splits missing arrays": ("splits.npz", lambda b: _npz(tr=np.zeros(3)), "missing array"),
    "splits float": (
        "splits.npz",
        lambda b: _npz(train=np.zeros((20, 3)), test=np.ones((20, 3))),
        "'train' must be a 2-D integer array",
    ),
    "splits overlap": (
        "splits.npz",
        lambda b: _npz(train=np.zeros((20, 3), int), test=np.zeros((20, 3), int)),
        "split 0: train and test rows overlap",
    ),
    "splits out of range": (
        "splits.npz",
        lambda b: _npz(train=np.full((20, 3), 999), test=np.zeros((20, 3), int)),
        r"train row indices out of range \[0, 308\)",
    ),
}


@pytest.mark.parametrize("case", list(UCI_CASES))
def test_corrupt_uci_file_names_the_file_and_the_problem(case, yacht):
    name, damage, problem = UCI_CASES[case]
    f = yacht / name
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(ValueError, match=problem) as err:
        load_uci("yacht", yacht.parent.parent)
    msg = str(err.value)
    assert str(f) in msg, msg
    assert not any(w in msg for w in NUMPY_WORDING), msg


def test_corrupt_uci_index_files_name_the_file(yacht):
    """The source repository's layout (index_train_<i>.txt) instead of splits.npz."""
    z = np.load(yacht / "splits.npz")
    for i in range(z["train"].shape[0]):
        np.savetxt(yacht / f"index_train_{i}.txt", z["train"][i], fmt="%d")
        np.savetxt(yacht / f"index_test_{i}.txt", z["test"][i], fmt="%d")
    (yacht / "splits.npz").unlink()
    assert load_uci("yacht", yacht.parent.parent).train_idx.shape == z["train"].shape
    bad = yacht / "index_test_3.txt"
    bad.write_text("1\n2\nx\n")
    with pytest.raises(ValueError, match=rf"{bad}: .*'x' is not an integer \(data row 3"):
        load_uci("yacht", yacht.parent.parent)
    bad.write_text("1\n2\n")
    with pytest.raises(ValueError, match=r"index_test_<i>\.txt files hold different numbers of rows"):
        load_uci("yacht", yacht.parent.parent)


# ----------------------------------------------------------------------------- images


@pytest.fixture
def mnist_dir(tmp_path):
    images._CACHE.clear()
    d = tmp_path / "mnist"
    d.mkdir()
    good = _npz(x=np.zeros((5, 28, 28), np.uint8), y=np.arange(5))
    (d / "train.npz").write_bytes(good)
    (d / "test.npz").write_bytes(good)
    yield d
    images._CACHE.clear()


def _npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    return buf.getvalue()


IMAGE_CASES = {
    "not npz": (b"hello world", "pickled or object data"),
    "pickle": (pickle.dumps({"x": 1}), "pickled or object data"),
    "object array": (_npz(x=np.array([object()] * 5), y=np.arange(5)), "pickled or object data"),
    "bare npy": (_npy(), "a single .npy array, not an .npz archive"),
    "empty": (b"", "truncated, corrupted or not an .npz"),
    "float images": (_npz(x=np.zeros((5, 28, 28)), y=np.arange(5)), "x must be uint8 images"),
    "labels out of range": (
        _npz(x=np.zeros((5, 28, 28), np.uint8), y=np.arange(5) + 20),
        r"labels must lie in \[0, 10\)",
    ),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_corrupt_image_file_names_the_file_and_the_problem(case, mnist_dir):
    content, problem = IMAGE_CASES[case]
    f = mnist_dir / "train.npz"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=problem) as err:
        images.load_mnist(mnist_dir.parent)
    msg = str(err.value)
    assert str(f) in msg and not any(w in msg for w in NUMPY_WORDING), msg


def test_undecodable_class_names_file(mnist_dir):
    (mnist_dir / "classes.txt").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=rf"{mnist_dir / 'classes.txt'}: not a UTF-8 text file"):
        images.load_mnist(mnist_dir.parent)
