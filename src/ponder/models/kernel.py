"""Building and loading ``llama_kernel.c``: compiled with the system's C compiler
(``cc``, or ``$CC``) on first use and cached under ``$PONDER_CACHE_DIR`` (default
``~/.cache/ponder``), keyed by the source, the flags and the processor, so later
processes load it in a millisecond. Without a compiler ``load_kernel()`` returns None
and ``NativeLM`` uses numpy: the C path is an accelerator, never a requirement.
``PONDER_NO_C=1`` turns it off. A cached build whose instructions the CPU lacks is
refused before any call into it. ``CLlama`` (``llama_c.py``) is the model that uses it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path


SOURCE = Path(__file__).with_name("llama_kernel.c")
# -ffast-math lets the compiler vectorise the dot products' sums (results differ from a
# sequential sum by float rounding only) and call glibc's vector expf; the kernel uses
# no infinities or NaNs. It is given to the compile step only: linking a shared library
# with it would add crtfastmath.o, which flushes denormals for the whole process.
# -march=native because the library is built on the machine that runs it;
# PONDER_KERNEL_MARCH overrides it (x86-64 builds the portable scalar path).
MARCH = os.environ.get("PONDER_KERNEL_MARCH", "native")
FLAGS = ["-O3", f"-march={MARCH}", "-fPIC", "-ffast-math"]
ISA_BITS = {1: "avx2", 2: "fma", 4: "avx512f"}  # ponder_isa()'s bits and their /proc/cpuinfo names

_kernel: ctypes.CDLL | None = None
_kernel_error: str | None = None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo), empty where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except (OSError, IndexError):
        pass
    return set()


def cpu_summary() -> dict[str, object]:
    """What benchmarks print so that figures from different machines can be told
    apart: the CPU's model name, its SIMD features and the core count."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    flags = cpu_flags()
    simd = [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if x in flags]
    return {"cpu": name or platform.processor() or platform.machine(), "simd": simd, "cores": os.cpu_count()}


def _cpu_id(cc: str) -> str:
    """What the build's target means on this machine, for the cache key: the compiler's
    own expansion of -march (every -m feature it turns on) and the CPU's flags. Two
    hosts with the same model name but different features get different builds."""
    try:
        r = subprocess.run([cc, f"-march={MARCH}", "-###", "-E", "-x", "c", os.devnull], capture_output=True,
                           text=True, timeout=30)
        expanded = r.stderr
    except (OSError, subprocess.SubprocessError):
        expanded = ""
    return expanded + "\n" + " ".join(sorted(cpu_flags())) + "\n" + platform.processor()


def missing_features(isa: int, flags: set[str]) -> list[str]:
    """Instruction sets a build uses (``ponder_isa()`` bits) that the CPU lacks."""
    if not flags:  # nothing known of the CPU: trust the build made on it
        return []
    return [name for bit, name in ISA_BITS.items() if isa & bit and name not in flags]


def torch_openmp() -> str | None:
    """The GNU OpenMP runtime torch loaded (a file path), if any. The kernel links to
    that very library, so that its threads and torch's are one pool: two runtimes on
    the same cores would each spin-wait while the other works."""
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split()[-1]
            if "/libgomp" in path and ".so" in path:
                return path
    except (OSError, IndexError):
        pass
    return None


def _build(cc: str, target: Path, openmp: str | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, out = Path(tmp) / "kernel.o", Path(tmp) / target.name
        omp_compile = ["-fopenmp"] if openmp else []
        # the runtime by path (its soname is torch's, already loaded), not -lgomp
        omp_link = [openmp, f"-Wl,-rpath,{Path(openmp).parent}"] if openmp else []
        subprocess.run([cc, *FLAGS, *omp_compile, "-c", "-o", str(obj), str(SOURCE)], check=True,
                       capture_output=True, timeout=120)
        subprocess.run([cc, "-shared", "-o", str(out), str(obj), *omp_link, "-lm"], check=True, capture_output=True,
                       timeout=60)
        os.replace(out, target)  # atomic: concurrent first uses never load half a file


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None if it cannot be built (the
    reason is in ``kernel_error()``)."""
    global _kernel, _kernel_error
    if _kernel is not None or _kernel_error is not None:
        return _kernel
    if os.environ.get("PONDER_NO_C"):
        _kernel_error = "disabled by PONDER_NO_C"
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        _kernel_error = "no C compiler found (set CC)"
        return None
    root = Path(os.environ.get("PONDER_CACHE_DIR") or Path.home() / ".cache" / "ponder")
    lib = None
    # with torch's OpenMP runtime when there is one (passes of many rows then use its
    # threads); else, or if that build fails, a one-thread build
    cpu = _cpu_id(cc)
    for openmp in dict.fromkeys([torch_openmp(), None]):
        key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), cc, cpu, str(openmp)]).encode())
        target = root / "kernels" / f"llama_{key.hexdigest()[:16]}.so"
        try:
            if not target.exists():
                _build(cc, target, openmp)
            lib = ctypes.CDLL(str(target))
            break
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            _kernel_error = f"building {SOURCE.name} failed: {e} {detail.decode(errors='replace')[:500]}".strip()
    if lib is None:
        return None
    # Before calling anything else in: a build whose instructions this CPU lacks would
    # die with SIGILL (a cache shared between different hosts).
    lib.ponder_isa.restype = ctypes.c_int
    missing = missing_features(lib.ponder_isa(), cpu_flags())
    if missing:
        _kernel_error = (f"the cached kernel {target.name} uses {', '.join(missing)}, which this CPU lacks; "
                         f"delete {target} or set PONDER_CACHE_DIR")
        return None
    _kernel_error = None
    p = ctypes.c_void_p
    i = ctypes.c_int
    lib.ponder_forward.argtypes = [p, p, i, i, p, p, p, ctypes.c_int64, p, p, p, p, p, p, p, i, p, i, p, i]
    lib.ponder_forward.restype = ctypes.c_int
    lib.ponder_greedy_draft.argtypes = [p, p, i, i, p, p, p, ctypes.c_int64, p, p, p, i, p]
    lib.ponder_greedy_draft.restype = ctypes.c_int
    lib.ponder_greedy_steps.argtypes = [p, ctypes.c_int64, i, p, p, p, ctypes.c_int64, p, p, p, i, p, i, p, i, i, i, p, p,
                                        p, i]
    lib.ponder_greedy_steps.restype = ctypes.c_int
    c64 = ctypes.c_int64
    lib.ponder_greedy_round.argtypes = [p, p, p, i, p, i, i, p, p, p, c64, p, p, p, p, p, p, c64, p, p, p, i, p, p, p,
                                        i]
    lib.ponder_greedy_round.restype = ctypes.c_int
    lib.ponder_greedy_speculate.argtypes = [p, p, p, i, p, i, i, i, i, p, i, p, p, p, c64, p, p, p, p, p, p, c64, p, p,
                                            p, i, p, p, p, p, p, i]
    lib.ponder_greedy_speculate.restype = ctypes.c_int
    lib.ponder_ngram_speculate.argtypes = [p, p, c64, i, i, i, p, i, p, p, p, c64, p, p, p, i, p, p, p, p, i]
    lib.ponder_ngram_speculate.restype = ctypes.c_int
    lib.ponder_openmp.restype = ctypes.c_int
    _kernel = lib
    return lib


def kernel_error() -> str | None:
    return _kernel_error
