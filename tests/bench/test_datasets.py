"""Fashion-MNIST IDX reading, the search order, errors for missing/corrupt data, the text corpus."""

from __future__ import annotations

import gzip
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lightning_speedup.bench import datasets
from lightning_speedup.bench.datasets import (
    DataError,
    fashion_mnist_search_path,
    find_fashion_mnist,
    load_fashion_mnist,
    load_text_corpus,
    read_idx,
)

FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No env var, an empty user cache, and no Debian folder: only what a test puts there is found."""
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "DEBIAN_DIR", tmp_path / "no-debian")
    return tmp_path


def _copy_set(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        (dest / name).symlink_to(src / name)
    return dest


def test_real_files_shape_dtype_labels(fashion_mnist_dir: Path) -> None:
    data = load_fashion_mnist(fashion_mnist_dir, download=False)
    assert data.train_images.shape == (60000, 28, 28) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (10000, 28, 28)
    assert data.train_labels.dtype == torch.int64 and data.train_labels.shape == (60000,)
    assert int(data.train_labels.min()) == 0 and int(data.train_labels.max()) == 9
    # The classes are balanced: 6000 per class in train, 1000 in test.
    assert torch.bincount(data.train_labels).tolist() == [6000] * 10
    assert torch.bincount(data.test_labels).tolist() == [1000] * 10
    # Known first labels of the official training file (Ankle boot, T-shirt, T-shirt, Dress).
    assert data.train_labels[:4].tolist() == [9, 0, 0, 3]


def test_read_idx_plain_and_gzip_agree(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    plain = tmp_path / "t10k-labels-idx1-ubyte"
    plain.write_bytes(gzip.decompress((fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    assert (read_idx(plain) == read_idx(fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz")).all()


def test_search_order(isolated: Path, fashion_mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = _copy_set(fashion_mnist_dir, isolated / "explicit")
    env_root = isolated / "env"
    _copy_set(fashion_mnist_dir, env_root / "fashion-mnist")
    cache = _copy_set(fashion_mnist_dir, isolated / "cache" / "lightning_speedup" / "fashion-mnist")
    monkeypatch.setenv(datasets.ENV_VAR, str(env_root))
    order = fashion_mnist_search_path(explicit)
    assert order[0] == explicit
    assert order.index(env_root / "fashion-mnist") < order.index(isolated / "no-debian") < order.index(cache)
    assert find_fashion_mnist(explicit, download=False) == explicit
    assert find_fashion_mnist(None, download=False) == env_root / "fashion-mnist"
    monkeypatch.delenv(datasets.ENV_VAR)
    assert find_fashion_mnist(None, download=False) == cache
    # An incomplete folder is skipped, not half-read.
    partial = isolated / "partial"
    partial.mkdir()
    (partial / FILES[0]).symlink_to(fashion_mnist_dir / FILES[0])
    assert find_fashion_mnist(partial, download=False) == cache


def test_missing_data_error_lists_places_and_fixes(isolated: Path) -> None:
    with pytest.raises(DataError) as info:
        find_fashion_mnist(isolated / "nowhere", download=False)
    msg = str(info.value)
    for place in fashion_mnist_search_path(isolated / "nowhere"):
        assert str(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert datasets.ENV_VAR in msg and "download disabled" in msg


# MD5 of the shared copies in ../shared/data/fashion-mnist: the same images and labels as the official files,
# gzipped again (2020 timestamps), so their .gz checksums differ from the published ones in FASHION_MNIST_MD5.
SHARED_MD5 = {
    "train-images-idx3-ubyte.gz": "cf8536b0aa1a6ac5fa3f23001093305c",
    "train-labels-idx1-ubyte.gz": "10bea18fdb374794d4bb42e356e600c9",
    "t10k-images-idx3-ubyte.gz": "f78720b4224f21cce2f2ccf2d7a94c9a",
    "t10k-labels-idx1-ubyte.gz": "0d30e22e447f3c33dab9ed536400ac01",
}


@pytest.fixture
def local_server(isolated: Path, fashion_mnist_dir: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving copies of the real files; yields (base URL, served folder)."""
    served = isolated / "served"
    served.mkdir()
    for name in FILES:
        shutil.copy(fashion_mnist_dir / name, served / name)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/", served
    finally:
        server.shutdown()


def test_download_from_a_real_local_server_verifies_checksums(
    isolated: Path, local_server: tuple[str, Path]
) -> None:
    base, _ = local_server
    dest = isolated / "cache" / "lightning_speedup" / "fashion-mnist"
    datasets.download_fashion_mnist(dest, base_urls=[base], checksums=SHARED_MD5, allow_http_loopback=True)
    data = load_fashion_mnist(None, download=False)  # found in the user cache
    assert data.source == dest
    assert data.train_images.shape == (60000, 28, 28) and data.test_labels.shape == (10000,)
    assert not list(dest.glob("*.part"))


def test_a_checksum_mismatch_deletes_the_download_and_names_the_file(
    isolated: Path, local_server: tuple[str, Path]
) -> None:
    base, served = local_server
    labels = served / "t10k-labels-idx1-ubyte.gz"
    corrupt = bytearray(labels.read_bytes())
    corrupt[100] ^= 0xFF
    labels.write_bytes(bytes(corrupt))
    dest = isolated / "dl"
    with pytest.raises(
        DataError, match=r"Downloaded t10k-labels-idx1-ubyte.gz from .* has MD5 [0-9a-f]{32}, but "
    ):
        datasets.download_fashion_mnist(
            dest, base_urls=[base], checksums=SHARED_MD5, allow_http_loopback=True
        )
    assert not (dest / "t10k-labels-idx1-ubyte.gz").exists()
    assert not list(dest.glob("*.part"))
    # The published checksums are the defaults: the re-gzipped shared copies do not pass them either.
    with pytest.raises(
        DataError,
        match=r"train-images-idx3-ubyte.gz .* published checksum is 8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    ):
        datasets.download_fashion_mnist(isolated / "dl2", base_urls=[base], allow_http_loopback=True)


def test_download_refuses_plain_http() -> None:
    assert all(url.startswith("https://") for url in datasets.FASHION_MNIST_URLS)
    with pytest.raises(ValueError, match=r"only https URLs are allowed"):
        datasets.download_fashion_mnist(Path("unused"), base_urls=["http://example.com/"])
    with pytest.raises(
        ValueError, match=r"only https URLs are allowed"
    ):  # the test override is loopback-only
        datasets.download_fashion_mnist(
            Path("unused"), base_urls=["http://example.com/"], allow_http_loopback=True
        )


def test_wrong_magic_number(tmp_path: Path) -> None:
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x12\x34\x56\x78" + bytes(100)))
    with pytest.raises(DataError, match=r"magic number 0x12345678.*Delete"):
        read_idx(bad)


def test_truncated_gzip(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    cut = tmp_path / "t10k-labels-idx1-ubyte.gz"
    cut.write_bytes((fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()[:2000])
    with pytest.raises(DataError, match="truncated"):
        read_idx(cut)


def test_truncated_payload(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    raw = gzip.decompress((fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    short = tmp_path / "t10k-labels-idx1-ubyte"
    short.write_bytes(raw[:-10])
    with pytest.raises(DataError, match="header promises 10000"):
        read_idx(short)


def test_corrupt_file_in_search_folder_names_the_file(isolated: Path, fashion_mnist_dir: Path) -> None:
    folder = isolated / "corrupt"
    folder.mkdir()
    for name in FILES:
        (folder / name).write_bytes((fashion_mnist_dir / name).read_bytes())
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"not a gzip file at all")
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz"):
        load_fashion_mnist(folder, download=False)


def test_text_corpus_split_and_round_trip(shakespeare_path: Path) -> None:
    corpus = load_text_corpus(shakespeare_path)
    text = shakespeare_path.read_text(encoding="utf-8")
    assert corpus.vocab_size == 65
    n = len(text)
    assert len(corpus.train_ids) == int(n * 0.9) and len(corpus.train_ids) + len(corpus.val_ids) == n
    assert corpus.decode(corpus.val_ids[:200]) == text[int(n * 0.9) : int(n * 0.9) + 200]
    assert corpus.decode(corpus.encode("ROMEO:")) == "ROMEO:"
    with pytest.raises(ValueError, match="not in this corpus"):
        corpus.encode("\u00e9")


def test_text_corpus_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_text_corpus(tmp_path / "missing.txt")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(("caf\u00e9 " * 400).encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_text_corpus(latin1)
    with pytest.raises(ValueError, match="val_fraction"):
        load_text_corpus(latin1, val_fraction=1.5)
