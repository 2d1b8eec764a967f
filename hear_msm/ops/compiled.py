"""Small C libraries compiled on first use with the system C compiler (the CPU kernels' plumbing).

`selective_scan.py` (Mamba selective scan) and `mlstm.py` (mLSTM gate matrix) each have a C source
file in `csrc/` without Python or torch headers; `CompiledKernel` builds it once per process into
`$HEAR_MSM_CACHE` (default `~/.cache/hear_msm`), keyed by a hash of source, flags and platform,
loads it with ctypes (whose calls release the GIL, so a shared thread pool can split work), and
reports a missing compiler or a failed build as one warning and `None`, so callers fall back to
PyTorch. `HEAR_MSM_NO_CPU_KERNEL=1` disables every compiled kernel.

The source is compiled with the kernel's flags and linked in a separate step without them: with
-ffast-math gcc would link crtfastmath.o, which turns on flush-to-zero for the whole process.
A kernel built with `openmp=True` is compiled with -fopenmp when PyTorch's own libgomp.so.1 is
loaded (its parallel loops then run on PyTorch's thread team), else without it.

Every function that hands tensor pointers to C is marked `@c_entry_point`: under torch.compile
(`hear_msm._compile`) it runs eagerly, outside the traced graph. Traced, the C would read freed
memory: dynamo keeps only the integer `data_ptr()` and frees the tensor behind it.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch


_C_ENTRY_POINTS: list[dict] = []


def c_entry_point(function: Callable) -> Callable:
    """Mark a function that passes tensor pointers to C (see the module docstring). Eager calls cost
    one Python call more; `hide_c_entry_points_from_compiler` makes them opaque to torch.compile
    (without importing torch._dynamo here, which would add seconds to `import hear_msm`)."""
    target = {"call": function}
    _C_ENTRY_POINTS.append(target)

    @functools.wraps(function)
    def entry(*args, **kwargs):
        return target["call"](*args, **kwargs)
    return entry


def require_float32(what: str, **tensors) -> None:
    """The C kernels read raw float32 memory: refuse any other dtype or device before a pointer is
    taken (a bfloat16 tensor read as float32 would run past its end). None entries are skipped."""
    for name, tensor in tensors.items():
        if tensor is not None and (tensor.dtype != torch.float32 or tensor.device.type != "cpu"):
            raise ValueError(f"{what} takes float32 CPU tensors; {name} is {tensor.dtype} on {tensor.device.type}")


def hide_c_entry_points_from_compiler() -> None:
    """Route every `c_entry_point` through `torch.compiler.disable` (idempotent): torch.compile then
    breaks its graph at the call and runs the function, and all it calls, eagerly."""
    for target in _C_ENTRY_POINTS:
        if not getattr(target["call"], "_torchdynamo_disable", False):
            target["call"] = torch.compiler.disable(target["call"], reason="hear_msm C kernel: raw tensor pointers")


def cache_dir() -> Path:
    return Path(os.environ.get("HEAR_MSM_CACHE", Path.home() / ".cache" / "hear_msm"))


class CompiledKernel:
    """One C library: `load()` builds (once) and returns it, or None; `thread_pool(n)` shares workers.

    name: file stem of the cached library; flags: compile flags (called at build time, they may
    depend on the CPU); declare: sets the ctypes signatures of the loaded library; what /
    fallback: the words of the warning when it cannot be built.
    """

    def __init__(self, name: str, source: Path, flags: Callable[[], list[str]],
                 declare: Callable[[ctypes.CDLL], None], what: str, fallback: str, openmp: bool = False):
        self.name, self.source_file, self.flags, self.declare = name, source, flags, declare
        self.what, self.fallback, self.openmp = what, fallback, openmp
        self.uses_openmp = False  # set by the build: its parallel entry points run on PyTorch's team
        self._lock = threading.Lock()
        self._library: ctypes.CDLL | None = None
        self._tried = False
        self._pool: ThreadPoolExecutor | None = None

    def _build(self) -> ctypes.CDLL:
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if compiler is None:
            raise RuntimeError("no C compiler found (set CC or install gcc)")
        if self.openmp and self._torch_uses_libgomp():
            # with -fopenmp the library needs libgomp.so.1, which the loader resolves to the copy
            # PyTorch has loaded: one OpenMP runtime, one thread team. Without OpenMP support
            # (compiler or PyTorch build) the same source builds sequential, as `#ifdef _OPENMP` says.
            try:
                library = self._build_with(compiler, self.flags() + ["-fopenmp"])
                self.uses_openmp = True
                return library
            except (OSError, subprocess.CalledProcessError):
                pass
        return self._build_with(compiler, self.flags())

    @staticmethod
    def _torch_uses_libgomp() -> bool:
        import torch

        # only when PyTorch's OpenMP is a libgomp.so.1 already in this process (pip wheels on Linux):
        # a renamed or Intel runtime would make ours a second team competing for the cores
        return sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info() and any(
            line.endswith("/libgomp.so.1") for line in Path("/proc/self/maps").read_text().splitlines())

    def _build_with(self, compiler: str, flags: list[str]) -> ctypes.CDLL:
        code = self.source_file.read_text()
        key = hashlib.sha256((code + " ".join(flags) + sys.platform).encode()).hexdigest()[:16]
        target = cache_dir() / f"{self.name}_{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                source, obj, lib = Path(tmp, "kernel.c"), Path(tmp, "kernel.o"), Path(tmp, "kernel.so")
                source.write_text(code)
                subprocess.run([compiler, *flags, "-c", str(source), "-o", str(obj)], check=True, capture_output=True)
                # -lm: float64 copies and exact paths call libm's exp (its linker script also brings
                # libmvec, which gcc may use to vectorise it)
                link = ["-fopenmp"] if "-fopenmp" in flags else []
                subprocess.run([compiler, "-shared", *link, str(obj), "-o", str(lib), "-lm"], check=True,
                               capture_output=True)
                os.replace(lib, target)  # atomic: concurrent builders never see a half-written file
        library = ctypes.CDLL(str(target))
        self.declare(library)
        return library

    def load(self) -> ctypes.CDLL | None:
        """The compiled library, building it on first call; None (with one warning) if it cannot be built."""
        if self._tried:  # set after _library: no lock once decided (torch.compile cannot trace a lock)
            return self._library
        with self._lock:
            if not self._tried:
                if os.environ.get("HEAR_MSM_NO_CPU_KERNEL"):
                    self._tried = True
                    return None
                try:
                    self._library = self._build()
                except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
                    detail = getattr(err, "stderr", b"") or b""
                    warnings.warn(
                        f"hear_msm: could not build the compiled {self.what} ({err} "
                        f"{detail.decode(errors='replace')[:500]}); using {self.fallback}",
                        RuntimeWarning, stacklevel=4,
                    )
                self._tried = True
            return self._library

    def thread_pool(self, threads: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pool._max_workers < threads:
                self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"hear_msm_{self.name}")
            return self._pool
