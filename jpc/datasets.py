"""NumPy-only loaders for MNIST, Fashion-MNIST, digits and two moons.

MNIST and Fashion-MNIST are read from the canonical IDX `.gz` files. They are looked up,
in order, in

1. the `data_dir` argument,
2. `$JPC_DATA_DIR`,
3. the cache directory `$JPC_CACHE_DIR/<dataset>` (default `~/.cache/jpc/<dataset>`),

where each directory may hold the four files directly or in a `mnist/` or
`fashion_mnist/` subfolder. If none has them, they are downloaded from the canonical
mirrors into the cache and checked against their MD5 checksums.

scikit-learn's bundled 8×8 digits and the two-moons problem are small offline
alternatives (they need scikit-learn: `pip install "jpc[datasets]"`); `one_hot` and
`batches` turn any of them into training batches.
"""

import gzip
import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np


Split = Literal["train", "test"]
DatasetName = Literal["mnist", "fashion_mnist"]


class _DatasetInfo(NamedTuple):
    mirrors: tuple[str, ...]
    md5s: dict[str, str]


_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_DATASETS = {
    "mnist": _DatasetInfo(
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        md5s={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion_mnist": _DatasetInfo(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5s={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}

# IDX type codes (third byte of the magic number) and their big-endian dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DownloadError(RuntimeError):
    """Raised when a dataset is not available locally and every mirror failed."""


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {sorted(choices)}, got {value!r}.")


# --------------------------------------------------------------------------- IDX files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a NumPy array.

    **Arguments:**

    - `path`: the `.gz` or uncompressed IDX file.

    **Returns:**

    An array with the dimensions and element type given by the file's header, in
    native byte order.

    **Raises:**

    `ValueError` if the magic number, the type code or the amount of data does not
    match the IDX format.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    return _parse_idx(data, str(path))


def _parse_idx(data: bytes, name: str) -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{name}: not an IDX file (expected magic number 0x0000TTNN, got "
            f"{data[:4].hex() or 'no data'})."
        )
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{name}: unknown IDX type code {type_code:#04x}.")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{name}: truncated IDX header ({len(data)} bytes).")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header_size != expected:
        raise ValueError(
            f"{name}: header says shape {shape} ({expected} bytes of data), but the "
            f"file holds {len(data) - header_size} bytes after the header."
        )
    array = np.frombuffer(data, dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _read_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    image_file, label_file = _FILES[split]
    images, labels = read_idx(directory / image_file), read_idx(directory / label_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{image_file}: expected uint8 images of shape (n, rows, cols), got "
            f"{images.dtype} of shape {images.shape}."
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{label_file}: expected {images.shape[0]} labels, got shape "
            f"{labels.shape}."
        )
    x = images.reshape(images.shape[0], -1).astype(np.float32) / 255.0
    return x, labels.astype(np.int64)


# ------------------------------------------------------------------- checksums, search


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_md5sums(directory: Path) -> dict[str, str]:
    path = directory / "MD5SUMS"
    if not path.is_file():
        return {}
    entries = (line.split() for line in path.read_text().splitlines())
    return {parts[-1].lstrip("*"): parts[0] for parts in entries if len(parts) >= 2}


def _verify(directory: Path, filenames, md5s: dict[str, str]) -> None:
    listed = _read_md5sums(directory)
    for filename in filenames:
        actual = _md5(directory / filename)
        expected = {"canonical": md5s[filename], "MD5SUMS": listed.get(filename)}
        for source, md5 in expected.items():
            if md5 is not None and actual != md5:
                raise ValueError(
                    f"{directory / filename}: MD5 {actual} does not match the "
                    f"{source} checksum {md5}."
                )


def _cache_dir(name: str) -> Path:
    root = os.environ.get("JPC_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "jpc"
    return base / name


def _candidate_dirs(name: str, data_dir) -> Iterator[Path]:
    """The folders to search, in order; a given folder that does not exist raises
    (when it is reached), rather than the search silently moving on to the cache."""
    env = os.environ.get("JPC_DATA_DIR")
    roots = ((data_dir, "`data_dir`"), (env, "$JPC_DATA_DIR"))
    for root, what in roots:
        if root:
            root = Path(root).expanduser()
            if not root.is_dir():
                raise FileNotFoundError(
                    f"{what} is {str(root)!r}, which is not an existing folder; it "
                    f"was to be searched for the {name} files. Point it to the "
                    "folder holding the IDX .gz files (or a parent with a "
                    f"`{name}/` subfolder)."
                )
            yield from (root, root / name)
    yield _cache_dir(name)


def find_dataset(
    name: DatasetName,
    data_dir: str | os.PathLike | None = None,
    splits: tuple[str, ...] = ("train", "test"),
) -> Path | None:
    """Say where a dataset's IDX files are on disk, without downloading anything.

    **Arguments:**

    - `name`: `"mnist"` or `"fashion_mnist"`.
    - `data_dir`: a directory to look in first (the files themselves, or a parent with
      a `mnist/` or `fashion_mnist/` subfolder); then `$JPC_DATA_DIR`, then the cache.
    - `splits`: the splits whose files must all be present.

    **Returns:**

    The first directory holding every required file, or `None`.

    **Raises:**

    `ValueError` if `name` is unknown; `FileNotFoundError` naming the folder if
    `data_dir` or `$JPC_DATA_DIR` is set to a folder that does not exist.
    """
    _check_choice("name", name, _DATASETS)
    filenames = [f for split in splits for f in _FILES[split]]
    for directory in _candidate_dirs(name, data_dir):
        if all((directory / f).is_file() for f in filenames):
            return directory
    return None


def find_mnist(data_dir: str | os.PathLike | None = None) -> Path | None:
    """MNIST's local directory, or `None`.

    [`find_dataset`][jpc.datasets.find_dataset] for `"mnist"`, both splits.
    """
    return find_dataset("mnist", data_dir)


# ------------------------------------------------------------------------- downloading


def _fetch(url: str, target: Path, md5: str, timeout: float) -> None:
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        tmp_path = Path(tmp.name)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    tmp.write(chunk)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
    if _md5(tmp_path) != md5:
        tmp_path.unlink(missing_ok=True)
        raise ValueError(f"MD5 mismatch for {url} (expected {md5}).")
    tmp_path.replace(target)


def _download(name: str, filename: str, timeout: float) -> Path:
    info = _DATASETS[name]
    target = _cache_dir(name) / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for mirror in info.mirrors:
        try:
            _fetch(mirror + filename, target, info.md5s[filename], timeout)
            return target
        except (OSError, ValueError) as e:
            errors.append(f"  {mirror + filename}: {e}")
    raise DownloadError(
        f"Could not download {name} file {filename!r}; every mirror failed:\n"
        + "\n".join(errors)
        + "\nPut the four IDX .gz files in a folder and set the environment variable "
        "JPC_DATA_DIR to it (or pass `data_dir=`)."
    )


def _make_dirs(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents; return those new (deepest first)."""
    created, current = [], directory
    while not current.exists() and current != current.parent:
        created.append(current)
        current = current.parent
    directory.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders of `created` (deepest first) that are still empty."""
    for directory in created:
        try:
            directory.rmdir()
        except OSError:  # not empty (a file was downloaded) or already gone
            return


def download_dataset(name: DatasetName, split: Split, timeout: float = 60.0) -> Path:
    """Download a split's missing IDX files into the cache, checking their MD5s.

    **Arguments:**

    - `name`: `"mnist"` or `"fashion_mnist"`.
    - `split`: `"train"` or `"test"`.
    - `timeout`: seconds to wait on each connection.

    **Returns:**

    The cache directory now holding the files.

    **Raises:**

    `DownloadError` if every mirror fails for some file (cache folders this call
    created are removed again if they are left empty); `ValueError` for an unknown
    `name` or `split`.
    """
    _check_choice("name", name, _DATASETS)
    _check_choice("split", split, _FILES)
    created = _make_dirs(_cache_dir(name))
    try:
        for filename in _FILES[split]:
            if not (_cache_dir(name) / filename).is_file():
                _download(name, filename, timeout)
    except BaseException:
        _remove_empty(created)
        raise
    return _cache_dir(name)


# ----------------------------------------------------------------------- public loaders


def load_idx_dataset(
    name: DatasetName,
    split: Split,
    data_dir: str | os.PathLike | None = None,
    *,
    verify: bool = False,
    download: bool = True,
    timeout: float = 60.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of MNIST or Fashion-MNIST.

    **Arguments:**

    - `name`: `"mnist"` or `"fashion_mnist"`.
    - `split`: `"train"` (60000 examples) or `"test"` (10000).
    - `data_dir`: a directory to look in before `$JPC_DATA_DIR` and the cache.
    - `verify`: check local files against the canonical MD5s (and against an
      `MD5SUMS` file beside them, if there is one). Downloads are always checked.
    - `download`: fetch missing files into the cache; if `False`, missing files raise.
    - `timeout`: seconds to wait on each download connection.

    **Returns:**

    `(images, labels)`: `float32` images in `[0, 1]` of shape `(n, 784)` and `int64`
    labels of shape `(n,)`.

    **Raises:**

    `ValueError` for an unknown `name` or `split`, a malformed file or a checksum
    mismatch; `FileNotFoundError` if the files are missing and `download=False`
    (the message lists the folders searched), or if `data_dir` or `$JPC_DATA_DIR`
    names a folder that does not exist; `DownloadError` if every mirror fails.
    """
    _check_choice("name", name, _DATASETS)
    _check_choice("split", split, _FILES)
    directory = find_dataset(name, data_dir, splits=(split,))
    if directory is None and not download:
        searched = ", ".join(str(d) for d in _candidate_dirs(name, data_dir))
        raise FileNotFoundError(
            f"{name} ({split}) not found in any of the folders searched ({searched}), "
            "and `download=False`."
        )
    if directory is None:
        directory = download_dataset(name, split, timeout)
    elif verify:
        _verify(directory, _FILES[split], _DATASETS[name].md5s)
    return _read_split(directory, split)


def load_mnist(
    split: Split, data_dir: str | os.PathLike | None = None, **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST: `(images (n, 784) in [0, 1], labels (n,))`.

    [`load_idx_dataset`][jpc.datasets.load_idx_dataset] for `"mnist"`.

    Keyword arguments (`verify`, `download`, `timeout`) are passed on.
    """
    return load_idx_dataset("mnist", split, data_dir, **kwargs)


def load_fashion_mnist(
    split: Split, data_dir: str | os.PathLike | None = None, **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST: `(images (n, 784) in [0, 1], labels (n,))`.

    [`load_idx_dataset`][jpc.datasets.load_idx_dataset] for `"fashion_mnist"`.

    Keyword arguments (`verify`, `download`, `timeout`) are passed on.
    """
    return load_idx_dataset("fashion_mnist", split, data_dir, **kwargs)


def _require_sklearn(function: str) -> None:
    """Raise an `ImportError` that says how to install scikit-learn."""
    try:
        import sklearn  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"`jpc.datasets.{function}` needs scikit-learn, which is not installed. "
            'Install it with `pip install "jpc[datasets]"` (or `pip install '
            "scikit-learn`); MNIST and Fashion-MNIST need only NumPy."
        ) from err


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}.")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return (x_train, y_train), (x_test, y_test)


def load_digits_data(test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's bundled 8×8 digits (1797 images, 10 classes), split stratified.

    **Arguments:**

    - `test_fraction`: fraction of the examples held out for testing.
    - `seed`: seed of the split.

    **Returns:**

    `((x_train, y_train), (x_test, y_test))` with `float32` images in `[0, 1]` of shape
    `(n, 64)` and `int64` labels.

    **Raises:**

    `ValueError` if `test_fraction` is not in `(0, 1)`; `ImportError` if
    scikit-learn is not installed (`pip install "jpc[datasets]"`).
    """
    _require_sklearn("load_digits_data")
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return _split(x, digits.target.astype(np.int64), test_fraction, seed)


def load_moons(
    n_samples: int = 1000, noise: float = 0.1, seed: int = 0, test_fraction: float = 0.2
):
    """The two-moons problem (scikit-learn's `make_moons`), split stratified.

    **Arguments:**

    - `n_samples`: total number of points, train and test together.
    - `noise`: standard deviation of the Gaussian noise added to the points.
    - `seed`: seed of both the sampling and the split.
    - `test_fraction`: fraction of the points held out for testing.

    **Returns:**

    `((x_train, y_train), (x_test, y_test))` with `float32` points of shape `(n, 2)`
    and `int64` labels in `{0, 1}`.

    **Raises:**

    `ValueError` if `test_fraction` is not in `(0, 1)`; `ImportError` if
    scikit-learn is not installed (`pip install "jpc[datasets]"`).
    """
    _require_sklearn("load_moons")
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=n_samples, noise=noise, random_state=seed)
    return _split(x.astype(np.float32), y.astype(np.int64), test_fraction, seed)


# ----------------------------------------------------------------------------- batching


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """One-hot encode integer labels.

    **Arguments:**

    - `labels`: integer labels of shape `(n,)`.
    - `n_classes`: number of classes.

    **Returns:**

    A `float32` array of shape `(n, n_classes)`.

    **Raises:**

    `ValueError` if a label is outside `[0, n_classes)`.
    """
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"`labels` must lie in [0, {n_classes}), got values in "
            f"[{labels.min()}, {labels.max()}]."
        )
    return np.eye(n_classes, dtype=np.float32)[labels]


def _as_generator(key_or_seed) -> np.random.Generator:
    if isinstance(key_or_seed, np.random.Generator):
        return key_or_seed
    if isinstance(key_or_seed, int | np.integer):
        return np.random.default_rng(int(key_or_seed))
    try:  # a raw JAX key (uint32 array) converts directly ...
        words = np.asarray(key_or_seed)
    except TypeError:  # ... a typed JAX key needs its key data
        import jax

        words = np.asarray(jax.random.key_data(key_or_seed))
    return np.random.default_rng(words.astype(np.uint32).ravel().tolist())


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    key_or_seed,
    drop_last: bool = True,
    n_epochs: int | None = None,
    *,
    start: int = 0,
) -> "BatchIterator":
    """Iterate over shuffled minibatches, reshuffling with NumPy at every epoch.

    The iterator's `position` (the number
    of batches drawn so far) can be saved with a checkpoint; `batches(...,
    start=position)` with the same data, `batch_size`, `key_or_seed`, `drop_last`
    and `n_epochs` then gives the batches an uninterrupted run would have seen
    next:

    ```python
    it = datasets.batches(x, y, 64, key)
    ...  # train, then
    jpc.save_checkpoint(path, dict(model=model, opt_state=opt_state, data=it.position))
    # later, in a new process
    state = jpc.load_checkpoint(path, like)
    it = datasets.batches(x, y, 64, key, start=state["data"])
    ```

    **Arguments:**

    - `x`, `y`: arrays with the same leading size `n`.
    - `batch_size`: examples per batch.
    - `key_or_seed`: an `int` seed, a `np.random.Generator` or a JAX PRNG key. To
      resume with `start`, pass a seed or key (a generator that has already been
      used cannot be replayed).
    - `drop_last`: skip each epoch's last batch if it is smaller than `batch_size`.
    - `n_epochs`: number of passes over the data; `None` iterates for ever.
    - `start`: number of batches already drawn (a saved
      `position`); the iterator skips them,
      replaying the earlier epochs' shuffles. Default `0`.

    **Returns:**

    A [`BatchIterator`][jpc.datasets.BatchIterator] of `(x_batch, y_batch)` pairs.

    **Raises:**

    `ValueError` if `x` and `y` differ in length or are empty, `batch_size` is not
    positive or (with `drop_last`) larger than `n`, or `start` is not a
    non-negative integer.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"`x` and `y` must have equal lengths, got {n} and {len(y)}.")
    if n == 0:
        raise ValueError("`x` and `y` hold no examples (length 0).")
    if batch_size <= 0 or (drop_last and batch_size > n):
        raise ValueError(
            f"`batch_size` must be in [1, {n}] (the number of examples), got "
            f"{batch_size}."
        )
    if isinstance(start, bool) or not isinstance(start, int | np.integer) or start < 0:
        raise ValueError(
            "`start` must be a non-negative integer (the number of batches already "
            f"drawn), got {start!r}."
        )
    rng = _as_generator(key_or_seed)
    return BatchIterator(x, y, batch_size, rng, drop_last, n_epochs, int(start))


class BatchIterator:
    """Shuffled minibatches whose position can be saved and resumed.

    Made by [`batches`][jpc.datasets.batches]; iterate over it for
    `(x_batch, y_batch)` pairs. Where it is:

    - `position`: the number of batches drawn so far, an `int` to save with a
      checkpoint and pass back as `batches(..., start=position)`;
    - `epoch`, `step`: the epoch of the next batch and its index within that
      epoch (both from 0), so `position = epoch * batches_per_epoch + step`.
    """

    def __init__(self, x, y, batch_size, rng, drop_last, n_epochs, start):
        n = len(x)
        self._x, self._y, self._batch_size, self._rng = x, y, batch_size, rng
        self._stop = n - n % batch_size if drop_last else n
        self._per_epoch = -(-self._stop // batch_size)
        self._n_epochs = n_epochs
        self.position = start
        for _ in range(min(self.epoch, self.epoch if n_epochs is None else n_epochs)):
            rng.permutation(n)  # replay the shuffles of the skipped epochs
        self._order, self._order_epoch = rng.permutation(n), self.epoch

    position: int
    """Batches drawn so far: the `start` that resumes here."""

    @property
    def epoch(self) -> int:
        """Index of the epoch of the next batch (from 0)."""
        return self.position // self._per_epoch

    @property
    def step(self) -> int:
        """Index of the next batch within its epoch (from 0)."""
        return self.position % self._per_epoch

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self._n_epochs is not None and self.epoch >= self._n_epochs:
            raise StopIteration
        if self.epoch != self._order_epoch:
            self._order = self._rng.permutation(len(self._x))
            self._order_epoch = self.epoch
        first = self.step * self._batch_size
        idx = self._order[first : min(first + self._batch_size, self._stop)]
        self.position += 1
        return self._x[idx], self._y[idx]
