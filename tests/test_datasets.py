"""`jpc.datasets`: IDX parsing, look-up order, checksums, downloads, batching.

Every IDX file is written by the test itself (header packed with `struct` from the
format's definition), so the parsed arrays are checked against the bytes written.
The network is never used: `urllib.request.urlopen` is replaced by a fake.
"""

import gzip
import hashlib
import io
import re
import struct
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from jpc import datasets


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """An IDX file: magic 0x0000TTNN, big-endian u32 dims, big-endian data."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_split(directory, split, n, seed=0):
    """Write gzipped IDX images `(n, 28, 28)` and labels `(n,)`; return them."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    image_file, label_file = datasets._FILES[split]
    (directory / image_file).write_bytes(gzip.compress(_idx_bytes(images)))
    (directory / label_file).write_bytes(gzip.compress(_idx_bytes(labels)))
    return images, labels


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty cache under `tmp_path`, no `JPC_DATA_DIR`, no network."""
    monkeypatch.setenv("JPC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("JPC_DATA_DIR", raising=False)

    def offline(url, timeout=None):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return tmp_path


# ------------------------------------------------------------------------ IDX files


@pytest.mark.parametrize(
    "dtype, code",
    [(np.uint8, 0x08), (np.int16, 0x0B), (np.int32, 0x0C), (np.float64, 0x0E)],
)
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_returns_the_array_written(tmp_path, dtype, code, compress):
    array = (np.arange(2 * 3 * 4) - 7).reshape(2, 3, 4).astype(dtype)
    if dtype is np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    data = _idx_bytes(array, code)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    path.write_bytes(gzip.compress(data) if compress else data)
    out = datasets.read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)
    # The element at [i, j, k] is the big-endian value at byte offset of its index.
    item = np.dtype(dtype).itemsize
    offset = 4 + 4 * 3 + item * (1 * 12 + 2 * 4 + 3)
    expected = np.frombuffer(
        data[offset : offset + item], np.dtype(dtype).newbyteorder(">")
    )
    assert out[1, 2, 3] == expected[0]


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\x01\x00\x08\x01", "not an IDX file"),
        (b"", "not an IDX file"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "unknown IDX type"),
        (b"\x00\x00\x08\x02\x00\x00", "truncated IDX header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x00\x01", "header says"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path, data, match):
    path = tmp_path / "bad.idx"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match):
        datasets.read_idx(path)


def test_load_scales_pixels_and_flattens(env):
    images, labels = _write_split(env / "data", "test", 5)
    x, y = datasets.load_mnist("test", env / "data", download=False)
    assert x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x, images.reshape(5, 784) / np.float32(255))
    np.testing.assert_array_equal(y, labels)


def test_wrong_image_layout_is_reported(env):
    d = env / "data"
    d.mkdir()
    image_file, label_file = datasets._FILES["test"]
    (d / image_file).write_bytes(
        gzip.compress(_idx_bytes(np.zeros((2, 784), np.uint8)))
    )
    (d / label_file).write_bytes(gzip.compress(_idx_bytes(np.zeros(2, np.uint8))))
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \(n, rows"):
        datasets.load_mnist("test", d, download=False)
    (d / image_file).write_bytes(
        gzip.compress(_idx_bytes(np.zeros((2, 3, 3), np.uint8)))
    )
    (d / label_file).write_bytes(gzip.compress(_idx_bytes(np.zeros(3, np.uint8))))
    with pytest.raises(ValueError, match="expected 2 labels, got shape"):
        datasets.load_mnist("test", d, download=False)


# ------------------------------------------------------------------ where files are


def test_data_dir_then_jpc_data_dir_then_cache(env, monkeypatch):
    in_cache = _write_split(env / "cache" / "mnist", "test", 3, seed=1)
    x, y = datasets.load_mnist("test", download=False)
    np.testing.assert_array_equal(y, in_cache[1])
    assert datasets.find_dataset("mnist", splits=("test",)) == env / "cache" / "mnist"

    # JPC_DATA_DIR wins over the cache, with the files in a `mnist/` subfolder.
    from_env = _write_split(env / "shared" / "mnist", "test", 4, seed=2)
    monkeypatch.setenv("JPC_DATA_DIR", str(env / "shared"))
    x, y = datasets.load_mnist("test", download=False)
    np.testing.assert_array_equal(y, from_env[1])
    assert datasets.find_dataset("mnist", splits=("test",)) == env / "shared" / "mnist"

    # `data_dir` wins over both, with the files directly inside.
    given = _write_split(env / "given", "test", 2, seed=3)
    x, y = datasets.load_mnist("test", env / "given", download=False)
    np.testing.assert_array_equal(y, given[1])
    np.testing.assert_array_equal(x, given[0].reshape(2, -1) / np.float32(255))


def test_find_needs_every_file_of_the_splits(env):
    _write_split(env / "cache" / "mnist", "test", 2)
    assert datasets.find_mnist() is None  # the train files are missing
    assert datasets.find_dataset("mnist", splits=("test",)) is not None
    assert datasets.find_dataset("fashion_mnist", splits=("test",)) is None


def test_missing_files_without_download(env):
    with pytest.raises(FileNotFoundError, match="download=False"):
        datasets.load_fashion_mnist("train", download=False)


def test_unknown_name_or_split(env):
    with pytest.raises(ValueError, match="`name` must be one of"):
        datasets.load_idx_dataset("cifar", "train")
    with pytest.raises(ValueError, match="`split` must be one of"):
        datasets.load_mnist("valid")


# ------------------------------------------------------------------------ checksums


def _use_md5s_of(monkeypatch, directory, split):
    """Make the files in `directory` the canonical ones (their MD5s)."""
    md5s = {
        f: hashlib.md5((directory / f).read_bytes()).hexdigest()
        for f in datasets._FILES[split]
    }
    info = datasets._DATASETS["mnist"]._replace(md5s=md5s)
    monkeypatch.setitem(datasets._DATASETS, "mnist", info)
    return md5s


def test_verify_accepts_matching_and_rejects_other_checksums(env, monkeypatch):
    d = env / "data"
    images, _ = _write_split(d, "test", 3)
    with pytest.raises(ValueError, match="does not match the canonical checksum"):
        datasets.load_mnist("test", d, verify=True)
    md5s = _use_md5s_of(monkeypatch, d, "test")
    x, _ = datasets.load_mnist("test", d, verify=True)
    np.testing.assert_array_equal(x, images.reshape(3, -1) / np.float32(255))
    # An MD5SUMS file beside the data is checked too.
    image_file, label_file = datasets._FILES["test"]
    (d / "MD5SUMS").write_text(
        f"{md5s[image_file]}  {image_file}\n{'0' * 32} *{label_file}\n"
    )
    with pytest.raises(ValueError, match="does not match the MD5SUMS checksum 0{32}"):
        datasets.load_mnist("test", d, verify=True)


# ------------------------------------------------------------------------ downloads


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_fills_the_cache_and_checks_md5(env, monkeypatch):
    source = env / "server"
    images, labels = _write_split(source, "test", 4)
    _use_md5s_of(monkeypatch, source, "test")
    urls = []

    def serve(url, timeout=None):
        urls.append(url)
        if url.startswith(datasets._DATASETS["mnist"].mirrors[0]):
            raise urllib.error.URLError("first mirror down")
        return _Response((source / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    x, y = datasets.load_mnist("test")
    np.testing.assert_array_equal(y, labels)
    cached = env / "cache" / "mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted(datasets._FILES["test"])
    assert len(urls) == 4  # each file: first mirror failed, second served it


def test_download_with_wrong_md5_keeps_nothing(env, monkeypatch):
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout=None: _Response(b"corrupt")
    )
    with pytest.raises(datasets.DownloadError, match="MD5 mismatch") as info:
        datasets.download_dataset("mnist", "test", timeout=1.0)
    assert "JPC_DATA_DIR" in str(info.value)
    assert not (env / "cache").exists()


def test_failed_download_removes_the_empty_cache_folder(env):
    (env / "cache").mkdir()  # existed before: kept
    with pytest.raises(datasets.DownloadError) as info:
        datasets.load_mnist("train")
    message = str(info.value)
    for mirror in datasets._DATASETS["mnist"].mirrors:
        assert mirror in message  # every mirror's reason, not only the first line
    assert "network disabled in tests" in message
    assert "set the environment variable JPC_DATA_DIR" in message
    assert (env / "cache").is_dir() and not (env / "cache" / "mnist").exists()


# --------------------------------------------------------------- scikit-learn data


@pytest.mark.parametrize("load", ["load_digits_data", "load_moons"])
def test_sklearn_loaders_name_the_extra_when_missing(monkeypatch, load):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` fails
    with pytest.raises(
        ImportError, match=r'needs scikit-learn.*pip install "jpc\[datasets'
    ):
        getattr(datasets, load)()


def test_digits_and_moons_split_stratified():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    (x_train, y_train), (x_test, y_test) = datasets.load_digits_data(0.25, seed=1)
    reference = load_digits()
    assert len(x_train) + len(x_test) == len(reference.target)
    # Every example appears once: rows of the split are rows of data / 16.
    rows = {r.tobytes() for r in (reference.data / 16.0).astype(np.float32)}
    assert all(r.tobytes() in rows for r in np.concatenate([x_train, x_test]))
    np.testing.assert_array_equal(
        np.bincount(np.concatenate([y_train, y_test])), np.bincount(reference.target)
    )
    (p_train, _), (p_test, t_test) = datasets.load_moons(100, noise=0.0, seed=0)
    assert (
        len(p_train) == 80
        and len(p_test) == 20
        and np.bincount(t_test).tolist() == [10, 10]
    )
    # Noise-free moons: label 0 on the unit circle about (0, 0), label 1 on the one
    # about (1, 0.5).
    (p_train, t_train) = datasets.load_moons(100, noise=0.0, seed=0)[0]
    centres = np.array([[0.0, 0.0], [1.0, 0.5]])[t_train]
    np.testing.assert_allclose(
        np.linalg.norm(p_train - centres, axis=1), 1.0, rtol=1e-6
    )
    with pytest.raises(ValueError, match="`test_fraction` must be in"):
        datasets.load_moons(test_fraction=1.0)


# ------------------------------------------------------------------------- batching


def test_one_hot_matches_a_hand_written_result():
    expected = np.array(
        [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=np.float32
    )
    out = datasets.one_hot(np.array([2, 0, 3, 2]), 4)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 4\), got values"):
        datasets.one_hot(np.array([0, 4]), 4)


@pytest.mark.parametrize("drop_last", [True, False])
def test_batches_cover_every_example_once_per_epoch(drop_last):
    n, batch = 23, 5
    x = np.arange(n)[:, None] * np.ones((1, 3))
    y = np.arange(n)
    it = datasets.batches(x, y, batch, 0, drop_last=drop_last, n_epochs=3)
    per_epoch = n // batch if drop_last else -(-n // batch)
    out = list(it)
    assert len(out) == 3 * per_epoch
    orders = []
    for e in range(3):
        epoch = out[e * per_epoch : (e + 1) * per_epoch]
        seen = np.concatenate([yb for _, yb in epoch])
        for xb, yb in epoch:
            np.testing.assert_array_equal(xb[:, 0], yb)  # pairs stay together
        if drop_last:
            assert len(seen) == n - n % batch and len(set(seen)) == len(seen)
        else:
            np.testing.assert_array_equal(np.sort(seen), np.arange(n))
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1])  # reshuffled every epoch


def test_batches_same_seed_same_order_and_jax_keys():
    import jax.random as jr

    x = y = np.arange(10)
    a = [b for _, b in datasets.batches(x, y, 5, 7, n_epochs=2)]
    b = [b for _, b in datasets.batches(x, y, 5, np.random.default_rng(7), n_epochs=2)]
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    for key in (jr.PRNGKey(3), jr.key(3)):
        c = [b for _, b in datasets.batches(x, y, 5, key, n_epochs=1)]
        np.testing.assert_array_equal(np.sort(np.concatenate(c)), np.arange(10))


def test_batches_reject_bad_arguments():
    with pytest.raises(ValueError, match="equal lengths, got 3 and 2"):
        datasets.batches(np.zeros(3), np.zeros(2), 1, 0)
    with pytest.raises(ValueError, match=r"`batch_size` must be in \[1, 3\]"):
        datasets.batches(np.zeros(3), np.zeros(3), 4, 0)
    with pytest.raises(ValueError, match=r"`batch_size` must be in \[1, 3\]"):
        datasets.batches(np.zeros(3), np.zeros(3), 0, 0)
    with pytest.raises(ValueError, match=r"hold no examples \(length 0\)"):
        datasets.batches(np.zeros(0), np.zeros(0), 1, 0)


def _labels(it, n):
    return [yb for _, yb in (next(it) for _ in range(n))]


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("stop_at", [0, 3, 4, 5, 11])
def test_resumed_batches_equal_an_uninterrupted_run(tmp_path, drop_last, stop_at):
    """Save the position with a checkpoint, resume: the same batches follow."""
    import jax.random as jr

    import jpc

    n, batch = 18, 5  # 3 full batches (+ a partial one) per epoch
    x, y = np.arange(n)[:, None] * np.ones((1, 2)), np.arange(n)
    key = jr.key(4)
    uninterrupted = _labels(datasets.batches(x, y, batch, key, drop_last), 14)
    it = datasets.batches(x, y, batch, key, drop_last)
    first = _labels(it, stop_at)
    per_epoch = 3 if drop_last else 4
    assert (it.position, it.epoch, it.step) == (
        stop_at,
        stop_at // per_epoch,
        stop_at % per_epoch,
    )
    jpc.save_checkpoint(tmp_path / "s.eqx", dict(data=it.position, key=key))
    state = jpc.load_checkpoint(tmp_path / "s.eqx", dict(data=0, key=jr.key(0)))
    resumed = datasets.batches(
        x, y, batch, state["key"], drop_last, start=state["data"]
    )
    after = _labels(resumed, 14 - stop_at)
    assert len(first + after) == len(uninterrupted)
    for a, b in zip(first + after, uninterrupted):
        np.testing.assert_array_equal(a, b)


def test_resumed_batches_respect_n_epochs():
    x = y = np.arange(10)
    full = [b for _, b in datasets.batches(x, y, 5, 3, n_epochs=2)]
    rest = [b for _, b in datasets.batches(x, y, 5, 3, n_epochs=2, start=3)]
    assert len(full) == 4 and len(rest) == 1
    np.testing.assert_array_equal(rest[0], full[3])
    assert list(datasets.batches(x, y, 5, 3, n_epochs=2, start=4)) == []
    assert list(datasets.batches(x, y, 5, 3, n_epochs=2, start=10**9)) == []


@pytest.mark.parametrize("start", [-1, 1.5, True, "3"])
def test_batches_reject_a_bad_start(start):
    with pytest.raises(ValueError, match="`start` must be a non-negative integer"):
        datasets.batches(np.zeros(3), np.zeros(3), 1, 0, start=start)


def test_a_data_folder_that_does_not_exist_is_named(env, monkeypatch):
    nowhere = env / "no" / "such"
    with pytest.raises(
        FileNotFoundError,
        match=rf"`data_dir` is '{nowhere}', which is not an existing folder; it was "
        "to be searched for the mnist files",
    ):
        datasets.load_mnist("test", nowhere)
    monkeypatch.setenv("JPC_DATA_DIR", str(nowhere))
    with pytest.raises(
        FileNotFoundError,
        match=rf"\$JPC_DATA_DIR is '{nowhere}', which is not an existing folder",
    ):
        datasets.load_mnist("test")  # not downloaded into the cache instead
    with pytest.raises(FileNotFoundError, match=r"\$JPC_DATA_DIR is"):
        datasets.find_mnist()
    assert not (env / "cache").exists()
    # a `data_dir` that holds the files is used before JPC_DATA_DIR is looked at
    given = _write_split(env / "given", "test", 2)
    np.testing.assert_array_equal(
        datasets.load_mnist("test", env / "given")[1], given[1]
    )


def test_missing_files_message_lists_the_folders_searched(env, monkeypatch):
    (env / "shared").mkdir()
    monkeypatch.setenv("JPC_DATA_DIR", str(env / "shared"))
    searched = [env / "shared", env / "shared" / "mnist", env / "cache" / "mnist"]
    searched = [str(d) for d in searched]
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(f"in any of the folders searched ({', '.join(searched)})"),
    ):
        datasets.load_mnist("test", download=False)
