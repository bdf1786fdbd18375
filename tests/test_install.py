"""Installing like the ecosystem: the project's sdist and wheel carry patches/ and native/ as package
data, a fresh venv with the wheel gets a working `kvtuner-edge`, and its `engine build` computes the
same cache key as the clone (so it finds the same cached engine wheel) -- in well under a minute."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _clone_build():
    sys.path.insert(0, str(ROOT / "native"))
    try:
        import build
    finally:
        sys.path.remove(str(ROOT / "native"))
    return build


def _expected_data() -> set[str]:
    files = {f"kvtuner_edge/patches/{p.name}" for p in (ROOT / "patches").glob("*.patch")}
    files |= {f"kvtuner_edge/native/{p.relative_to(ROOT / 'native')}" for p in (ROOT / "native").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    return files | {"kvtuner_edge/models/registry.json", "kvtuner_edge/search/refine.py"}


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel built from that sdist), as `pip install .` and an upload would make them."""
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-c", f"from setuptools import build_meta as b; print(b.build_sdist({str(out)!r}))"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    sdist = out / r.stdout.strip().splitlines()[-1]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                        str(sdist)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning" not in r.stderr.lower(), r.stderr[-2000:]
    return sdist, next(out.glob("kvtuner_edge-*.whl"))


def test_sdist_and_wheel_carry_the_engine_sources(dists):
    sdist, wheel = dists
    with tarfile.open(sdist) as tf:
        in_sdist = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for p in (ROOT / "patches").glob("*.patch"):
        assert f"patches/{p.name}" in in_sdist
    assert "native/build.py" in in_sdist and "native/kvtuner/llama-kvtuner.cpp" in in_sdist
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    missing = _expected_data() - names
    assert not missing, missing
    # the engine is built by `kvtuner-edge engine build`, not pulled (stock, compiled for 20 minutes) from PyPI
    assert "Requires-Dist: llama" not in meta and "Requires-Dist: numpy" in meta


def test_fresh_venv_gets_the_cli_and_the_same_engine(dists, tmp_path):
    _, wheel = dists
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    # the project's own dependencies from this environment (not the editable kvtuner_edge: .pth files of
    # a folder named in a .pth file are not read); the project from its wheel
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                        str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0 and "error" not in r.stderr.lower(), r.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    cli = venv / "bin" / "kvtuner-edge"
    r = subprocess.run([str(cli), "--help"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert all(c in r.stdout for c in ("plan", "export", "engine", "inspect"))
    r = subprocess.run([str(py), "-c", "import kvtuner_edge, kvtuner_edge.engine_build as b; print(kvtuner_edge.__file__); "
                        "print(b.script_path())"], cwd=tmp_path, capture_output=True, text=True, env=env)
    pkg, script = r.stdout.split()
    assert pkg.startswith(str(venv)) and script == str(Path(pkg).parent / "native" / "build.py")
    # the installed build script reads the installed patches: the same key as this clone's
    build = _clone_build()
    _, _, key = build.build_key(None, build.cmake_args("cpu", "90"))
    cached = sorted((build.cache_root() / "wheels" / f"cpu-{key}").glob("*.whl"))
    if not cached:
        pytest.skip(f"no cached engine wheel for key {key} here (the check would start a build)")
    r = subprocess.run([str(cli), "engine", "build", "--no-install", "--print-wheel"], cwd=tmp_path,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(cached[0]) and f"(key {key})" in r.stdout


def test_wheel_checks_of_the_build_script(tmp_path):
    build = _clone_build()
    good, bad = tmp_path / "good.whl", tmp_path / "bad.whl"
    meta = ("Metadata-Version: 2.1\nName: llama_cpp_python\nRequires-Dist: numpy>=1.20.0\n"
            "Requires-Dist: jinja2>=2.11.3\nRequires-Dist: uvicorn>=0.22.0; extra == \"server\"\n")
    with zipfile.ZipFile(good, "w") as z:
        z.writestr("llama_cpp/lib/libllama.so", b"\x7fELF")
        z.writestr("llama_cpp_python-0.3.36.dist-info/METADATA", meta)
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("lib/libllama.so", b"\x7fELF")
        z.writestr("llama_cpp_python-0.3.36.dist-info/METADATA", meta)
    assert build.wheel_is_complete(good) and not build.wheel_is_complete(bad)
    assert build.wheel_requirements(good) == ["numpy>=1.20.0", "jinja2>=2.11.3"]
