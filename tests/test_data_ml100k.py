"""MovieLens-100k from the recbole wheel: checksum handling (no network) and the real data."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import dir_entries, ml100k_data_dir, ml100k_wheel  # noqa: F401  (fixtures)

from srp4ctr import data
from srp4ctr.data import download, loaders
from srp4ctr.data.pipeline import build
from srp4ctr.errors import ChecksumError

REPO = Path(__file__).resolve().parents[1]


def _fake_wheel_bytes() -> bytes:
    """A wheel-shaped zip with tiny ml-100k members (wrong sha256, of course)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(download.WHEEL_MEMBERS["inter"],
                   "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                   "1\t10\t5\t881250949\n1\t20\t3\t881250949\n2\t10\t4\t881250000\n")
        z.writestr(download.WHEEL_MEMBERS["item"],
                   "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                   "10\tToy Story\t1995\tAnimation Children's Comedy\n"
                   "20\tOdd One\tunkonwn\tDrama\n")
        z.writestr(download.WHEEL_MEMBERS["user"],
                   "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
                   "1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n")
    return buf.getvalue()


def test_checksum_mismatch_of_a_download(tmp_path, monkeypatch):
    monkeypatch.delenv(download.ENV_WHEEL, raising=False)
    calls = []

    def fake_download(dest: Path) -> None:
        calls.append(dest)
        (dest / download.WHEEL_NAME).write_bytes(_fake_wheel_bytes())

    monkeypatch.setattr(download, "downloader", fake_download)
    with pytest.raises(ChecksumError, match="sha256") as e:
        data.prepare("ml-100k", data_dir=tmp_path, progress=False)
    assert calls and e.value.path is not None
    # the bad file is gone, nothing half-written remains
    assert not (tmp_path / "downloads" / download.WHEEL_NAME).exists()
    assert list((tmp_path / "downloads").iterdir()) == []
    assert dir_entries(tmp_path) == []


def test_checksum_mismatch_of_a_cached_or_given_wheel(tmp_path, monkeypatch):
    monkeypatch.delenv(download.ENV_WHEEL, raising=False)
    monkeypatch.setattr(download, "downloader", lambda dest: pytest.fail("must not download"))
    bad = tmp_path / "downloads" / download.WHEEL_NAME
    bad.parent.mkdir()
    bad.write_bytes(_fake_wheel_bytes())
    with pytest.raises(ChecksumError):
        data.prepare("ml-100k", data_dir=tmp_path, progress=False)
    assert not bad.exists()  # a corrupt cached download is removed
    mine = tmp_path / "mine.whl"
    mine.write_bytes(_fake_wheel_bytes())
    with pytest.raises(ChecksumError):
        data.prepare("ml-100k", path=mine, data_dir=tmp_path, progress=False)
    assert mine.exists()  # a file the user pointed at is left alone
    monkeypatch.setenv(download.ENV_WHEEL, str(mine))
    with pytest.raises(ChecksumError):
        data.prepare("ml-100k", data_dir=tmp_path, progress=False)
    assert dir_entries(tmp_path) == ["mine.whl"]


def test_ml100k_member_parsing_without_network():
    with zipfile.ZipFile(io.BytesIO(_fake_wheel_bytes())) as z:
        members = {k: z.read(m) for k, m in download.WHEEL_MEMBERS.items()}
    ds = build(loaders.load_ml100k_members(members, "fake.whl"), "ml-100k")
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (2, 2, 3)
    names = ds.meta["field_values"]["genre"]
    assert [names[g] for g in ds.item_table["genre"][1] if g] == ["Animation", "Children's", "Comedy"]
    years = ds.meta["field_values"]["year"]
    assert years[ds.item_table["year"][1]] == "1995-1999" and years[ds.item_table["year"][2]] == "unknown"
    ages = ds.meta["field_values"]["age"]
    assert [ages[a] for a in ds.user_table["age"][1:]] == ["18-24", "50-55"]
    occ = ds.meta["field_values"]["occupation"]
    assert [occ[o] for o in ds.user_table["occupation"][1:]] == ["technician", "other"]
    assert ds.label.tolist() == [1, 0, 1]  # user 1: items 10 (5), 20 (3); user 2: item 10 (4)


@pytest.mark.slow
def test_ml100k_real(ml100k_data_dir, monkeypatch):
    monkeypatch.setattr(download, "downloader", lambda dest: pytest.fail("wheel should be cached"))
    ds = data.prepare("ml-100k", data_dir=ml100k_data_dir, progress=False)
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (943, 1682, 100_000)
    assert ds.split_counts() == {"train": 79_619, "valid": 9_942, "test": 10_439}
    s = ds.summary()
    assert s["seq_len"] == {"min": 20, "median": 65.0, "mean": 106.0445, "max": 737}
    assert s["positive_rate"] == pytest.approx(0.55375)
    assert s["vocab"]["item"] == 1684 and s["vocab"]["genre"] == 20 and s["vocab"]["rating"] == 6
    assert ds.item_fields == ["item", "genre", "year"] and ds.multi_fields == ["genre"]
    assert ds.user_fields == ["age", "gender", "occupation"]
    assert not ds.from_cache
    # equal timestamps are ordered by raw item id
    same = (ds.user[1:] == ds.user[:-1]) & (ds.timestamp[1:] == ds.timestamp[:-1])
    assert same.sum() > 40_000
    assert np.all(ds.item_raw[ds.item[1:]][same] > ds.item_raw[ds.item[:-1]][same])
    # the second call reuses the cache
    arrays = ds.path / "arrays" / "item.npy"
    mtime = arrays.stat().st_mtime_ns
    again = data.prepare("ml-100k", data_dir=ml100k_data_dir, progress=False)
    assert again.from_cache and arrays.stat().st_mtime_ns == mtime
    assert again.fingerprint == ds.fingerprint
    # and the CLI prints the same statistics from the cache
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-m", "srp4ctr", "data", "prepare", "--dataset", "ml-100k",
         "--data-dir", str(ml100k_data_dir), "--quiet"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed["splits"] == {"train": 79_619, "valid": 9_942, "test": 10_439}
    assert printed["fingerprint"] == ds.fingerprint and printed["from_cache"] is True
