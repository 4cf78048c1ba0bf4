"""Atomic outputs (mema_jax.fileio): all or nothing, never over an existing folder, and readable
like a file the user wrote themselves (the umask's mode, not tempfile's private 0600/0700)."""
from __future__ import annotations

import os
import stat

import pytest

from mema_jax.fileio import atomic_file, atomic_folder, atomic_write_bytes


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_file_gets_the_umask_mode_not_tempfiles_0600(tmp_path, umask_027):
    out = tmp_path / "report.md"
    atomic_write_bytes(out, b"table")
    assert out.read_bytes() == b"table"
    assert _mode(out) == 0o640
    plain = tmp_path / "plain.md"
    plain.write_bytes(b"x")
    assert _mode(out) == _mode(plain)


def test_atomic_folder_gets_the_umask_mode_not_mkdtemps_0700(tmp_path, umask_027):
    out = tmp_path / "images"
    with atomic_folder(out) as tmp:
        (tmp / "a.png").write_bytes(b"png")
    assert (out / "a.png").read_bytes() == b"png"
    assert _mode(out) == 0o750


def test_a_failed_block_leaves_no_output_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "weights.bin"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


def test_atomic_folder_refuses_an_existing_output(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("input")
    with pytest.raises(FileExistsError, match=str(out)), atomic_folder(out):
        pass
    assert (out / "keep.txt").read_text() == "input"
