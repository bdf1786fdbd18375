"""`kvtuner-edge engine build`: the patched engine built and installed into the running environment.

The build itself is native/build.py (standard library only, so the Makefile and the GPU drivers run it
before anything is installed). A clone has it at native/build.py beside patches/; an installed package
(`pip install .`, or a wheel or sdist of the project) has the same files at kvtuner_edge/native/ and
kvtuner_edge/patches/. Either way build.py finds the patches beside itself, and the build's cache key
(sdist, patches and our sources, cmake args) is the same, so both use the same cached wheel.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .errors import KVTunerError


def script_path() -> Path:
    here = Path(__file__).resolve().parent
    for cand in (here / "native" / "build.py", here.parent / "native" / "build.py"):
        if cand.is_file():
            return cand
    raise KVTunerError(f"the engine's build script is not installed with this package (looked in {here / 'native'} "
                       f"and {here.parent / 'native'})")


def script():
    """native/build.py as a module (build_key, sources_hash, build, main, ...)."""
    path = script_path()
    name = "kvtuner_edge_native_build"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str]) -> int:
    """native/build.py's command line (python native/build.py ARGS)."""
    return int(script().main(argv))
