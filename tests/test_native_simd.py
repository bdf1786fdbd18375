"""The CPU kernels of native/ggml/ggml-cpu/kvquants-cpu.c (q3_kv/q2_kv dot products, their cache writes,
the V accumulation) against the same file built without SIMD, bit for bit, through
scripts/kvq_simd_check.sh: this machine's x86 flags and, where Debian's aarch64 cross compiler and
qemu-user are installed, aarch64 NEON with and without the dotprod extension (correctness only)."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _x86_flags() -> set[str]:
    if platform.machine() not in ("x86_64", "AMD64"):
        return set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


@pytest.mark.parametrize("target", ["host", "host-plain", "aarch64", "aarch64-dotprod"])
def test_simd_kernels_are_bit_identical_to_scalar(patched_src, target):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    if target.startswith("host") and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the host targets use x86 flags")
    if target == "host" and not {"avx2", "fma", "f16c"} <= _x86_flags():
        pytest.skip("this CPU lacks AVX2/FMA/F16C")
    if target.startswith("aarch64") and not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")):
        pytest.skip("needs Debian's gcc-aarch64-linux-gnu and qemu-user")
    p = subprocess.run(["bash", str(ROOT / "scripts" / "kvq_simd_check.sh"), target], capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, SRC=str(patched_src)))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    for check in ("vec_dot q3_kv x q8_0", "vec_dot q2_kv x q8_1", "from_float q3_kv", "from_float q2_kv"):
        assert re.search(rf"{re.escape(check)}: 2000 rows of 256, 0 differ", out), (check, out)
    if target == "host":  # the AVX2 V accumulation exists there and must have been compared
        for t in ("q3_kv", "q2_kv"):
            assert f"mad {t}: 2000 rows of 256, 0 values differ" in out, out
    if target != "host-plain":  # the grouped decode kernel's K and V sides (AVX2, NEON) must have run
        for t in ("q3_kv", "q2_kv"):
            assert re.search(rf"mad_rows {t}: 900 chunks of 256, worst error ", out), out
        assert re.search(r"dot_heads q3_kv: 900 rows of 256, worst error ", out), out
    assert out.rstrip().endswith("all equal"), out


def test_cache_bytes_are_the_same_on_x86_and_aarch64(patched_src):
    """The q3_kv/q2_kv reference quantizers write the same bytes on every ISA: no fused multiply-adds
    (GCC contracts across statements by default, and aarch64 has FMA in its base ISA) and x86's
    float-to-int conversion made explicit (a plain cast of an out-of-range value saturates on ARM)."""
    if shutil.which("cc") is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("compares an x86 build with an aarch64 one")
    if not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")):
        pytest.skip("needs Debian's gcc-aarch64-linux-gnu and qemu-user")
    p = subprocess.run(["bash", str(ROOT / "scripts" / "kvq_simd_check.sh"), "host-plain", "aarch64"],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, SRC=str(patched_src)))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    hashes = re.findall(r"^reference bytes: (.*)$", p.stdout, re.M)
    assert len(hashes) == 2 and hashes[0] == hashes[1], p.stdout
