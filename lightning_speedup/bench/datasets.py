"""Real data sets for the bench's reference tasks: Fashion-MNIST from IDX files and a character-level corpus.

Fashion-MNIST (Xiao et al., 2017) is read from the standard IDX files (gzipped or not) wherever users
have them. The search order is documented in :func:`find_fashion_mnist` and the error for missing
data lists every place that was tried and the two ways to get the files.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
import urllib.parse
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

ENV_VAR = "LIGHTNING_SPEEDUP_DATA"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
# https only: the S3 website mirror the Zalando README also lists serves plain http.
FASHION_MNIST_URLS = ("https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",)
# MD5 of each official .gz file, as published in the Zalando repository's README (torchvision checks the same).
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Pixel statistics of the Fashion-MNIST training set, for normalisation.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(RuntimeError):
    """A data set is missing, corrupt or malformed; the message says which file and how to fix it."""


def cache_dir() -> Path:
    """The per-user cache for downloaded data (``$XDG_CACHE_HOME/lightning_speedup`` or ``~/.cache/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lightning_speedup"


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (LeCun's MNIST format), gzipped or plain, into a numpy array.

    Raises:
        DataError: the file is truncated, not gzip when named ``.gz``, has a wrong magic number, or its
            size does not match its header.
    """
    path = Path(path)
    fix = f"Delete {path} and get the file again (see `lightning_speedup.bench.datasets.find_fashion_mnist`)."
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as err:
        raise DataError(f"Cannot read {path}: {err} (truncated or not a gzip file). {fix}") from err
    if len(raw) < 4:
        raise DataError(f"{path} is only {len(raw)} bytes long, too short for an IDX header. {fix}")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise DataError(
            f"{path} has magic number 0x{raw[:4].hex()}, which is not an IDX header "
            f"(expected 0x0000080{{1,3}} for MNIST-style labels/images). {fix}"
        )
    header_end = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header_end])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise DataError(
            f"{path} holds {len(raw) - header_end} data bytes but its header promises {expected} "
            f"(shape {shape}); the file is truncated or corrupt. {fix}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape).astype(dtype.newbyteorder("="))


@dataclass(frozen=True)
class FashionMNIST:
    """The whole data set as tensors: images (N, 28, 28) uint8, labels (N,) int64."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    source: Path


def _file_in(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


def _complete(folder: Path) -> bool:
    return all(_file_in(folder, stem) for stem in FASHION_MNIST_FILES.values())


def fashion_mnist_search_path(path: str | Path | None = None) -> list[Path]:
    """The folders :func:`find_fashion_mnist` tries, in order."""
    candidates: list[Path] = []
    if path is not None:
        candidates += [Path(path), Path(path) / "fashion-mnist"]
    env = os.environ.get(ENV_VAR)
    if env:
        candidates += [Path(env) / "fashion-mnist", Path(env)]
    candidates += [DEBIAN_DIR, cache_dir() / "fashion-mnist"]
    return candidates


def _check_url(base: str, allow_http_loopback: bool) -> None:
    parts = urllib.parse.urlsplit(base)
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and allow_http_loopback and parts.hostname in _LOOPBACK_HOSTS:
        return
    raise ValueError(
        f"Refusing to download Fashion-MNIST from {base!r}: only https URLs are allowed "
        "(allow_http_loopback=True admits http://127.0.0.1 for tests)."
    )


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_fashion_mnist(
    dest: Path,
    timeout: float = 30.0,
    *,
    base_urls: Sequence[str] | None = None,
    checksums: Mapping[str, str] | None = None,
    allow_http_loopback: bool = False,
) -> Path:
    """Download the four official ``.gz`` files into ``dest`` over https and verify their published MD5s.

    Args:
        base_urls: mirrors to try in order (default :data:`FASHION_MNIST_URLS`); each must be https.
        checksums: expected MD5 per file name (default :data:`FASHION_MNIST_MD5`, the published ones).
        allow_http_loopback: for tests only: also accept ``http://`` URLs whose host is the loopback
            interface (a local ``http.server``); never a remote http host.

    Raises:
        ValueError: a URL that is not https.
        DataError: a downloaded file whose MD5 differs from the published one (the file is deleted).
        OSError: every mirror failed (offline, not found); the message has each mirror's error.
    """
    urls = FASHION_MNIST_URLS if base_urls is None else tuple(base_urls)
    expected = FASHION_MNIST_MD5 if checksums is None else checksums
    for base in urls:
        _check_url(base, allow_http_loopback)
    dest.mkdir(parents=True, exist_ok=True)
    errors = []
    for base in urls:
        try:
            for stem in FASHION_MNIST_FILES.values():
                name = f"{stem}.gz"
                target = dest / name
                if target.is_file():
                    continue
                tmp = target.with_suffix(".gz.part")
                log.info("downloading %s%s", base, name)
                try:
                    with urllib.request.urlopen(f"{base}{name}", timeout=timeout) as resp:
                        tmp.write_bytes(resp.read())
                    got = _md5(tmp)
                    if got != expected[name]:
                        raise DataError(
                            f"Downloaded {name} from {base} has MD5 {got}, but the published checksum is "
                            f"{expected[name]}: the download is corrupt or not the official file, and was deleted. "
                            "Try again, or fetch the file by hand and check it."
                        )
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                tmp.replace(target)  # a half-written or unverified file never looks complete
            return dest
        except OSError as err:
            errors.append(f"{base}: {err}")
    raise OSError("; ".join(errors))


def find_fashion_mnist(path: str | Path | None = None, download: bool = True) -> Path:
    """Locate a folder holding the four Fashion-MNIST IDX files.

    Looks, in order, at: ``path`` (and ``path/fashion-mnist``); ``$LIGHTNING_SPEEDUP_DATA/fashion-mnist``
    and ``$LIGHTNING_SPEEDUP_DATA``; ``/usr/share/datasets/fashion-mnist`` (Debian's
    ``dataset-fashion-mnist`` package); the user cache (``~/.cache/lightning_speedup/fashion-mnist``);
    then, if ``download``, fetches the official files into the user cache.

    Raises:
        DataError: none of these worked; the message lists every place tried and how to get the data.
    """
    tried = fashion_mnist_search_path(path)
    for folder in tried:
        if _complete(folder):
            return folder
    reason = "download disabled"
    if download:
        target = cache_dir() / "fashion-mnist"
        try:
            download_fashion_mnist(target)
            if _complete(target):
                return target
        except OSError as err:
            reason = f"download failed: {err}"
    places = "\n".join(f"  - {p}" for p in tried)
    raise DataError(
        "Fashion-MNIST was not found. Looked for train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), "
        f"t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz) in:\n{places}\n"
        f"and then tried the official download ({reason}).\n"
        "Get the data in one of two ways: (1) `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or "
        f"(2) download the four .gz files from {FASHION_MNIST_URLS[0]} into a folder and pass it as "
        f"`path=` or set {ENV_VAR}=that/folder."
    )


def load_fashion_mnist(path: str | Path | None = None, download: bool = True) -> FashionMNIST:
    """Load Fashion-MNIST as uint8 image and int64 label tensors (see :func:`find_fashion_mnist`)."""
    folder = find_fashion_mnist(path, download=download)
    arrays = {key: read_idx(_file_in(folder, stem)) for key, stem in FASHION_MNIST_FILES.items()}  # type: ignore[arg-type]
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"Fashion-MNIST {split} files in {folder} do not fit together: images {images.shape}, "
                f"labels {labels.shape}; expected (N, 28, 28) and (N,)."
            )
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"Fashion-MNIST {split} labels in {folder} exceed 9; the label file is corrupt.")
    return FashionMNIST(
        train_images=torch.from_numpy(arrays["train_images"].copy()),
        train_labels=torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        test_images=torch.from_numpy(arrays["test_images"].copy()),
        test_labels=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        source=folder,
    )


@dataclass(frozen=True)
class TextCorpus:
    """A character-level corpus: the vocabulary and the encoded train (first 90%) and val (last 10%) ids."""

    chars: tuple[str, ...]
    train_ids: Tensor
    val_ids: Tensor
    source: Path

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        try:
            return torch.tensor([index[c] for c in text], dtype=torch.long)
        except KeyError as err:
            raise ValueError(f"Character {err.args[0]!r} is not in this corpus' vocabulary.") from None

    def decode(self, ids: Tensor) -> str:
        return "".join(self.chars[i] for i in ids.tolist())


def load_text_corpus(path: str | Path, val_fraction: float = 0.1) -> TextCorpus:
    """Read any UTF-8 text file as a character corpus; the last ``val_fraction`` is validation."""
    path = Path(path)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    if not path.is_file():
        raise DataError(
            f"Text corpus {path} does not exist. Pass the path of a UTF-8 text file, e.g. Tiny Shakespeare's "
            "input.txt (https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt)."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}); convert it to UTF-8 first.") from err
    if len(text) < 1000:
        raise DataError(
            f"{path} holds only {len(text)} characters; a character-LM corpus needs at least 1000."
        )
    chars = tuple(sorted(set(text)))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    n_train = int(len(ids) * (1.0 - val_fraction))
    return TextCorpus(
        chars=chars, train_ids=ids[:n_train].clone(), val_ids=ids[n_train:].clone(), source=path
    )
