#!/usr/bin/env python3
"""Build the patched llama.cpp engine as a llama-cpp-python wheel, cached outside the clone.

    python native/build.py                       # CPU build, install into this Python
    python native/build.py --variant cuda --cuda-arch 90
    python native/build.py --variant metal       # on macOS
    python native/build.py --variant cpu-asan    # CPU with ASan + UBSan (not installed: scripts/fuzz_corpus.py --asan)
    python native/build.py --write-archive out.tar.xz   # trimmed source for a machine without network
    python native/build.py --source out.tar.xz --no-build-isolation --variant cuda

The same as `kvtuner-edge engine build [options]`: this file is installed with the package
(kvtuner_edge/native/build.py beside kvtuner_edge/patches/), so a `pip install` of the project
builds its engine the same way; run from a clone it reads the clone's patches/ and native/.

Steps: fetch the pinned llama-cpp-python sdist from PyPI and check its sha256; unpack it; copy
our own sources (native/kvtuner/) into vendor/llama.cpp/src; apply patches/*.patch in order
(a patch that does not apply stops the build and is named); build a wheel with pip
(scikit-build-core) in a work folder that survives an interruption (a second run resumes the
compile), printing the compile's progress; cache it under $KVTUNER_EDGE_CACHE (default
~/.cache/kvtuner-edge) keyed by sdist hash + patches and sources hash + cmake args; install it
with its own runtime requirements.  A second run with the same key only installs the cached
wheel.  Standard library only: it runs before the package's own dependencies exist.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e5709"

ROOT = Path(__file__).resolve().parent.parent
PATCH_DIR = ROOT / "patches"
OWN_SRC_DIR = ROOT / "native" / "kvtuner"   # -> llama.cpp src/
OWN_GGML_DIR = ROOT / "native" / "ggml"     # -> ggml/src/ (same sub-folders: ggml-cpu/, ggml-cuda/)

# what the trimmed archive leaves out of vendor/llama.cpp: not needed to build the library,
# the Python package or the command-line tools on CPU, CUDA or Metal
TRIM_DIRS = (
    "vendor/llama.cpp/models", "vendor/llama.cpp/docs", "vendor/llama.cpp/media",
    "vendor/llama.cpp/examples", "vendor/llama.cpp/gguf-py",
    "vendor/llama.cpp/benches", "vendor/llama.cpp/pocs", "vendor/llama.cpp/app",
    "vendor/llama.cpp/skills", "vendor/llama.cpp/ci", "vendor/llama.cpp/.devops",
    "vendor/llama.cpp/tools/server/webui", "vendor/llama.cpp/tools/server/public_legacy",
    "vendor/llama.cpp/ggml/src/ggml-vulkan", "vendor/llama.cpp/ggml/src/ggml-sycl",
    "vendor/llama.cpp/ggml/src/ggml-opencl", "vendor/llama.cpp/ggml/src/ggml-cann",
    "vendor/llama.cpp/ggml/src/ggml-musa", "vendor/llama.cpp/ggml/src/ggml-hip",
    "vendor/llama.cpp/ggml/src/ggml-webgpu", "vendor/llama.cpp/ggml/src/ggml-zdnn",
    "vendor/llama.cpp/ggml/src/ggml-hexagon", "vendor/llama.cpp/ggml/src/ggml-openvino",
    "vendor/llama.cpp/ggml/src/ggml-zendnn", "vendor/llama.cpp/ggml/src/ggml-virtgpu",
    "vendor/llama.cpp/ggml/src/ggml-et", "vendor/llama.cpp/.github",
    "vendor/llama.cpp/conversion", ".git", ".github", "docs", "examples", "tests", "docker",
)


class BuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[kvtuner-edge build] {msg}", flush=True)


def cache_root() -> Path:
    return Path(os.environ.get("KVTUNER_EDGE_CACHE", Path.home() / ".cache" / "kvtuner-edge"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sources_hash() -> str:
    """Hash of everything of ours that goes into the build: patches and native sources."""
    h = hashlib.sha256()
    own = sorted(OWN_SRC_DIR.glob("*")) + sorted(p for p in OWN_GGML_DIR.rglob("*") if p.is_file())
    for p in sorted(PATCH_DIR.glob("*.patch")) + own:
        h.update(str(p.relative_to(ROOT)).encode() if p.is_relative_to(OWN_GGML_DIR) else p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


SANITIZER_ARGS = ["-DLLAMA_SANITIZE_ADDRESS=ON", "-DLLAMA_SANITIZE_UNDEFINED=ON",
                  "-DGGML_SANITIZE_ADDRESS=ON", "-DGGML_SANITIZE_UNDEFINED=ON"]


# x86 SIMD level of the CPU code, as explicit flags (GGML_NATIVE stays off): "avx2" (AVX2 + FMA + F16C, what
# every x86 laptop of the last ten years has), "avx512" (that plus AVX-512 F/CD/VL/DQ/BW, and the VNNI, VBMI
# and BF16 extensions where the build machine has them), "auto" (the default: avx512 where the build machine
# has all five base extensions, else avx2). KVTUNER_CPU_ISA sets the default. A wheel is cached per level (the
# flags are part of its key) and runs only on CPUs with its extensions: build with --cpu-isa avx2 for another
# machine.
CPU_ISAS = ("auto", "avx2", "avx512")
AVX2_ARGS = ["-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"]
AVX512_BASE = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
AVX512_EXTRAS = (("avx512_vnni", "-DGGML_AVX512_VNNI=ON"), ("avx512vbmi", "-DGGML_AVX512_VBMI=ON"),
                 ("avx512_bf16", "-DGGML_AVX512_BF16=ON"))


def cpu_flags() -> set[str]:
    """The feature flags of this machine's CPU (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_cpu_isa(isa: str | None = None) -> str:
    """"avx2" or "avx512" for a requested level (None: $KVTUNER_CPU_ISA, else auto)."""
    isa = (isa or os.environ.get("KVTUNER_CPU_ISA") or "auto").lower()
    if isa not in CPU_ISAS:
        raise BuildError(f"CPU ISA {isa!r}: expected one of {', '.join(CPU_ISAS)}")
    if isa == "auto":
        isa = "avx512" if set(AVX512_BASE) <= cpu_flags() else "avx2"
    return isa


def x86_isa_args(isa: str | None = None) -> list[str]:
    if resolve_cpu_isa(isa) == "avx2":
        return list(AVX2_ARGS)
    have = cpu_flags()
    return AVX2_ARGS + ["-DGGML_AVX512=ON"] + [arg for flag, arg in AVX512_EXTRAS if flag in have]


def cmake_args(variant: str, cuda_arch: str, fa_quants: str = "all", cpu_isa: str | None = None) -> list[str]:
    args = ["-DLLAVA_BUILD=OFF", "-DLLAMA_CURL=OFF", "-DGGML_OPENMP=ON"]
    machine = platform.machine().lower()
    if variant == "metal":
        args += ["-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"]
    else:
        # GGML_NATIVE=ON builds AMX code that dies with SIGILL on these x86 machines
        args += ["-DGGML_NATIVE=OFF"]
        if machine in ("x86_64", "amd64"):
            args += x86_isa_args(cpu_isa)
    if variant == "cuda":
        # flash-attention vector kernels for every K/V type pair ("all"): without one a K type different
        # from the V type falls off the in-place path; a list ("q8_0-q4_0,q4_0-q3_kv") builds faster
        args += ["-DGGML_CUDA=ON", f"-DGGML_CUDA_FA_QUANTS={fa_quants}", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}"]
        # libggml-cuda.so re-exported C++ runtime symbols from a static archive it links (CMake's
        # default static CUDA runtime); when numpy or torch had loaded libstdc++ first, libllama's
        # std::ostream calls bound to those copies and crashed (codecvt::do_unshift, SIGSEGV at the
        # first model load; "free(): invalid pointer" beside torch). Keep archive symbols local.
        args += ["-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL"]
    if variant == "cpu-asan":
        # AddressSanitizer + UndefinedBehaviorSanitizer in libllama, libggml and the tools: the hostile-input
        # corpus runs the loader under it (a Python process needs LD_PRELOAD=libasan.so, see fuzz_corpus.py)
        args += SANITIZER_ARGS
    return args


def fetch_sdist() -> Path:
    dest = cache_root() / "sdist"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / SDIST_FILE
    if not path.exists():
        log(f"downloading {SDIST_NAME}=={SDIST_VERSION} (sdist) from PyPI")
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "-d", tmp, f"{SDIST_NAME}=={SDIST_VERSION}"], check=True)
            got = Path(tmp) / SDIST_FILE
            if not got.exists():
                raise BuildError(f"pip did not produce {SDIST_FILE}")
            os.replace(got, path)
    digest = sha256_file(path)
    if digest != SDIST_SHA256:
        raise BuildError(f"{path}: sha256 {digest} does not match the pinned {SDIST_SHA256}; delete it and retry")
    return path


def apply_patches(llama_dir: Path) -> None:
    for src in sorted(OWN_SRC_DIR.glob("*")):
        shutil.copy2(src, llama_dir / "src" / src.name)
    for src in sorted(p for p in OWN_GGML_DIR.rglob("*") if p.is_file()):
        dst = llama_dir / "ggml" / "src" / src.relative_to(OWN_GGML_DIR)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    patches = sorted(PATCH_DIR.glob("*.patch"))
    for p in patches:
        r = subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(p)], cwd=llama_dir,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"patch {p.name} does not apply to llama.cpp {LLAMA_CPP_COMMIT}:\n{r.stdout}{r.stderr}")
        log(f"applied {p.name}")


def unpack(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tf:
        tf.extractall(into, filter="data") if hasattr(tarfile, "data_filter") else tf.extractall(into)
    dirs = [d for d in into.iterdir() if d.is_dir()]
    if len(dirs) != 1:
        raise BuildError(f"{archive}: expected one top-level folder")
    return dirs[0]


def write_archive(out: Path) -> None:
    sdist = fetch_sdist()
    with tempfile.TemporaryDirectory() as tmp:
        top = unpack(sdist, Path(tmp))
        for rel in TRIM_DIRS:
            shutil.rmtree(top / rel, ignore_errors=True)
        for p in top.rglob("*"):
            if p.is_file() and p.suffix in (".gguf", ".png", ".jpg", ".mp4", ".wasm"):
                p.unlink()
        (top / "KVTUNER_SOURCE").write_text(json.dumps({"sdist_sha256": SDIST_SHA256, "trimmed": True}))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(out.name + ".tmp")
        with tarfile.open(tmp_out, "w:xz", preset=6) as tf:
            tf.add(top, arcname=top.name)
        os.replace(tmp_out, out)
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def build_key(source: Path | None, args: list[str]) -> tuple[Path, str, str]:
    """(source archive, key description, 16-hex key) for a build of `source` (default: the pinned
    sdist) with cmake `args`: the cache key of its wheel or tools."""
    if source is None:
        source = fetch_sdist()
        src_id = SDIST_SHA256
    else:
        src_id = sha256_file(source)
    key_src = json.dumps({"source": src_id, "ours": sources_hash(), "cmake": args,
                          "platform": f"{sys.platform}-{platform.machine()}"}, sort_keys=True)
    return source, key_src, hashlib.sha256(key_src.encode()).hexdigest()[:16]


def prepare_source(source: Path, work: Path) -> Path:
    """Unpack and patch `source` into `work` once; later calls reuse it (and its build folder)."""
    ready = work / "source-ready"
    if not ready.exists():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        top = unpack(source, work)
        apply_patches(top / "vendor" / "llama.cpp")
        ready.write_text(top.name)
    else:
        log(f"resuming the build in {work}")
    return work / ready.read_text()


TOOLS = ("llama-server", "llama-cli", "llama-bench", "llama-perplexity", "llama-batched-bench")


def tools_of(variant: str) -> tuple[str, ...]:
    """The sanitizer build makes only the two tools that meet files from users (the loader path)."""
    return ("llama-server", "llama-cli") if variant == "cpu-asan" else TOOLS


def tools_args(variant: str, cuda_arch: str = "90", fa_quants: str = "all", rpc: bool = False) -> list[str]:
    """cmake arguments of the tools build (they make its cache key)."""
    args = cmake_args(variant, cuda_arch, fa_quants) + ["-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TOOLS=ON",
                                                        "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_EXAMPLES=OFF",
                                                        "-DLLAMA_BUILD_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release"]
    return args + (["-DGGML_RPC=ON"] if rpc else [])


def tools_dir(variant: str = "cpu", cuda_arch: str = "90", fa_quants: str = "all", rpc: bool = False) -> Path:
    """Where build_tools puts (or has put) the tools of the pinned sdist with this checkout's patches."""
    _, _, key = build_key(None, tools_args(variant, cuda_arch, fa_quants, rpc))
    return cache_root() / "bin" / f"{variant}-{key}"


def build_tools(variant: str, cuda_arch: str, source: Path | None, jobs: int, fa_quants: str = "all",
                rpc: bool = False) -> Path:
    """The patched llama.cpp command-line tools (static build), cached like the wheel; returns their folder.

    rpc: GGML_RPC on (llama.cpp's RPC backend: `llama-server --rpc host:port`), building llama-server,
    llama-cli and `ggml-rpc-server` (llama.cpp's rpc-server) that serves this build's CPU or CUDA backend to them; its own
    cache key and folder, so the plain tools are not rebuilt. Both ends must come from this build: the cache types q3_kv/q2_kv are
    ids a stock rpc-server refuses (ggml-rpc checks type < GGML_TYPE_COUNT), and a stock server's
    kernels are not the patched ones."""
    args = tools_args(variant, cuda_arch, fa_quants, rpc)
    source, _, key = build_key(source, args)
    tools = ("llama-server", "llama-cli", "ggml-rpc-server") if rpc else tools_of(variant)
    bin_dir = cache_root() / "bin" / f"{variant}-{key}"
    with build_lock(f"tools-{variant}", key):
        if all((bin_dir / t).exists() for t in tools):
            log(f"cached tools in {bin_dir}")
            return bin_dir
        work = cache_root() / "build" / f"tools-{variant}-{key}"
        top = prepare_source(source, work)
        llama_dir = top / "vendor" / "llama.cpp"
        bdir = work / "cmake"
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        t0 = time.time()
        log(f"building {', '.join(tools)} ({variant}, key {key})")
        subprocess.run(["cmake", "-S", str(llama_dir), "-B", str(bdir), *gen, *args], check=True)
        subprocess.run(["cmake", "--build", str(bdir), "--parallel", str(jobs), "--target", *tools], check=True)
        tmp = bin_dir.with_name(bin_dir.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for t in tools:
            shutil.copy2(bdir / "bin" / t, tmp / t)
        shutil.rmtree(bin_dir, ignore_errors=True)
        os.replace(tmp, bin_dir)
        log(f"tools built in {time.time() - t0:.0f} s: {bin_dir}")
        return bin_dir


@contextlib.contextmanager
def build_lock(variant: str, key: str):
    """One build per key at a time (two clones running `make setup` at once used to run two ninjas in
    one build folder); a second build waits for the first and then takes its cached result."""
    root = cache_root() / "build"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{variant}-{key}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another build of this engine (key {key}) is running: waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


_STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]")


def run_with_progress(cmd: list[str], env: dict, what: str) -> int:
    """Run a build command, printing its compile progress (ninja's [n/N] steps) as one line per 5%
    instead of its whole output, and the end of the output when it fails.
    KVTUNER_EDGE_BUILD_VERBOSE=1 prints everything."""
    if os.environ.get("KVTUNER_EDGE_BUILD_VERBOSE", "0") not in ("", "0"):
        return subprocess.run(cmd, env=env).returncode
    tail: list[str] = []
    t0 = time.time()
    shown = -5
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", bufsize=1) as proc:
        for line in proc.stdout:
            tail.append(line)
            del tail[:-80]
            m = _STEP.match(line)
            if m:
                done, total = int(m.group(1)), int(m.group(2))
                pct = 100 * done // max(total, 1)
                if pct >= shown + 5 or done == total:
                    shown = pct
                    log(f"{what}: {done}/{total} build steps ({pct}%), {time.time() - t0:.0f} s")
        rc = proc.wait()
    if rc != 0:
        sys.stdout.write("".join(tail))
        sys.stdout.flush()
    return rc


def wheel_requirements(wheel: Path) -> list[str]:
    """The wheel's own runtime requirements: its METADATA's Requires-Dist lines without an extra."""
    with zipfile.ZipFile(wheel) as z:
        meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        text = z.read(meta).decode("utf-8", "replace") if meta else ""
    return [line.split(":", 1)[1].strip() for line in text.splitlines()
            if line.startswith("Requires-Dist:") and not re.search(r";.*\bextra\s*==", line)]


def wheel_is_complete(wheel: Path) -> bool:
    """An engine wheel holds its shared libraries inside the package (llama_cpp/lib/libllama.*); two
    builds in one work folder once produced a wheel with them only under lib/ (llama_cpp cannot load that)."""
    try:
        with zipfile.ZipFile(wheel) as z:
            return any(re.match(r"llama_cpp/lib/(lib)?llama\.(so|dylib|dll)", n) for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _build_locked(variant, key, args, source, key_src, wheel_dir, isolation, jobs, keep_build) -> list[Path]:
    wheels = sorted(wheel_dir.glob("*.whl"))
    if wheels and wheel_is_complete(wheels[0]):
        log(f"cached wheel {wheels[0]} (key {key})")
        return wheels
    for w in wheels:
        log(f"the cached {w} has no llama_cpp/lib: building it again")
        w.unlink()
    # a persistent work folder per key: an interrupted build resumes where ninja stopped
    work = cache_root() / "build" / f"{variant}-{key}"
    top = prepare_source(source, work)
    log(f"building the {variant} engine (key {key}) in {work}; cmake args: {' '.join(args)}")
    log("the first build of a key takes 5 to 25 minutes (16 to 2 cores); its wheel is cached, later runs take seconds")
    t0 = time.time()
    out = work / "wheel"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, CMAKE_ARGS=" ".join(args), CMAKE_BUILD_PARALLEL_LEVEL=str(jobs))
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(out),
           "--config-settings", f"build-dir={work / 'cmake'}", str(top)]
    if not isolation:
        cmd.insert(4, "--no-build-isolation")
    rc = run_with_progress(cmd, env, f"{variant} engine")
    if rc != 0:
        raise BuildError(f"the wheel build failed (exit {rc}); the end of its output is above. "
                         f"Run the same command again to resume it.")
    built = sorted(out.glob("*.whl"))
    if not built:
        raise BuildError("pip wheel produced no wheel")
    if not wheel_is_complete(built[0]):
        raise BuildError(f"{built[0]} has no llama_cpp/lib: the build folder {work} is damaged; delete it and "
                         f"run the same command again")
    wheel_dir.mkdir(parents=True, exist_ok=True)
    tmp_dest = wheel_dir / (built[0].name + ".part")
    shutil.copy2(built[0], tmp_dest)
    os.replace(tmp_dest, wheel_dir / built[0].name)
    (wheel_dir / "key.json").write_text(key_src)
    log(f"built in {time.time() - t0:.0f} s")
    if not keep_build:
        shutil.rmtree(work, ignore_errors=True)
    wheels = sorted(wheel_dir.glob("*.whl"))
    return wheels


def build(variant: str, cuda_arch: str, source: Path | None, isolation: bool,
          install: bool, jobs: int, keep_build: bool = False, fa_quants: str = "all") -> Path:
    args = cmake_args(variant, cuda_arch, fa_quants)
    source, key_src, key = build_key(source, args)
    wheel_dir = cache_root() / "wheels" / f"{variant}-{key}"
    with build_lock(variant, key):
        wheels = _build_locked(variant, key, args, source, key_src, wheel_dir, isolation, jobs, keep_build)
    if install:
        log(f"installing {wheels[0].name} into {sys.prefix}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q", str(wheels[0])],
                       check=True)
        # then llama-cpp-python's own runtime requirements, read from the wheel: numpy is one, and on a fresh
        # venv a list without it made pip print "llama-cpp-python 0.3.36 requires numpy>=1.20.0, which is not
        # installed"
        reqs = wheel_requirements(wheels[0])
        if reqs:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", *reqs], check=True)
        log(f"installed {wheels[0].name} into {sys.prefix}")
    return wheels[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=("cpu", "cuda", "metal", "cpu-asan"), default="cpu",
                    help="cpu-asan: CPU with AddressSanitizer + UndefinedBehaviorSanitizer, never installed")
    ap.add_argument("--cuda-arch", default=os.environ.get("KVTUNER_CUDA_ARCH", "90"),
                    help="CMAKE_CUDA_ARCHITECTURES for --variant cuda (default 90: H100/H200)")
    ap.add_argument("--fa-quants", default="all",
                    help="--variant cuda: the K-V type pairs with a flash-attention vector kernel, \"all\" (default) "
                         "or a list such as q8_0-q4_0,q4_0-q3_kv (faster builds; other pairs convert K/V to f16)")
    ap.add_argument("--source", type=Path, help="build from this (trimmed) source archive instead of the PyPI sdist")
    ap.add_argument("--no-build-isolation", action="store_true",
                    help="use the scikit-build-core already installed (machines without network)")
    ap.add_argument("--no-install", action="store_true", help="build or find the cached wheel, do not install it")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--keep-build", action="store_true", help="keep the build folder (objects) after success")
    ap.add_argument("--write-archive", type=Path, metavar="OUT.tar.xz",
                    help="write a trimmed source archive (for carrying to a machine without network) and exit")
    ap.add_argument("--print-wheel", action="store_true", help="print the wheel path on the last line")
    ap.add_argument("--tools", action="store_true",
                    help="build the patched command-line tools (" + ", ".join(TOOLS) + ") instead of the wheel; "
                         "prints their folder")
    ap.add_argument("--cpu-isa", choices=CPU_ISAS, default=None,
                    help="x86: the CPU code's SIMD level, avx2 or avx512 (default auto, or $KVTUNER_CPU_ISA: avx512 where "
                         "this machine has it); a wheel runs only on CPUs with its level")
    ap.add_argument("--rpc", action="store_true",
                    help="with --tools: also llama.cpp's RPC backend (GGML_RPC) and ggml-rpc-server (layers served by "
                         "other machines)")
    a = ap.parse_args(argv)
    try:
        if a.cpu_isa:
            os.environ["KVTUNER_CPU_ISA"] = resolve_cpu_isa(a.cpu_isa)   # for every build below (and their keys)
        if a.write_archive:
            write_archive(a.write_archive)
            return 0
        if a.tools:
            print(build_tools(a.variant, a.cuda_arch, a.source, a.jobs, a.fa_quants, a.rpc))
            return 0
        # the sanitizer engine needs libasan preloaded into Python: it would break the plain one if installed
        install = not a.no_install and a.variant != "cpu-asan"
        wheel = build(a.variant, a.cuda_arch, a.source, not a.no_build_isolation,
                      install, a.jobs, a.keep_build, a.fa_quants)
        if a.print_wheel:
            print(wheel)
    except (BuildError, subprocess.CalledProcessError) as e:
        print(f"kvtuner-edge build failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
