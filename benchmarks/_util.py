"""Shared helpers of the benchmark scripts: timing, thread settings, tables, JSON."""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch


# CPU flags that decide which kernels run (vector width, native bfloat16 / int8 dot products, AMX)
FLAGS_THAT_MATTER = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                     "amx_tile", "amx_bf16", "amx_int8")


# how the benchmarks time a call: wall time, or the calling thread's CPU time (one thread only: all
# compute then runs on it, and time the machine gives to other processes is not counted)
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def cpu_description() -> dict:
    """Vendor, model name and the flags above, from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {"cpu_vendor": fields.get("vendor_id"), "cpu_model": fields.get("model name"),
            "cpu_family": fields.get("cpu family"), "cpu_flags": [f for f in FLAGS_THAT_MATTER if f in flags]}


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), **cpu_description(),
        "platform": platform.platform(), "load_average_at_start": load, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def best_time(function, repeats: int = 3, min_seconds: float = 0.0, clock=time.perf_counter) -> float:
    """Minimum time of `function()` over `repeats` calls after one warm-up (noise is one-sided);
    `clock` time.perf_counter (wall) or time.thread_time (this thread's CPU time, for one thread)."""
    function()
    times = []
    started = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - started < min_seconds:
        start = clock()
        function()
        times.append(clock() - start)
    return min(times)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux: ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.rjust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=1))
    print(f"wrote {path}")


def progress(done: int, total: int, label: str) -> None:
    bar = "#" * int(30 * done / max(total, 1))
    print(f"\r[{bar:<30}] {done}/{total} {label[:50]:<50}", end="", file=sys.stderr, flush=True)
    if done == total:
        print(file=sys.stderr)


def points_in_fresh_processes(script: str, jobs: list[tuple[str, float]], size_key: str, extra_args: list[str],
                              max_seconds: float) -> list[dict]:
    """Run `script --one MODEL SIZE *extra_args` once per job in a new Python process (so its peak
    RSS belongs to that point alone) and collect the JSON line each prints. A point whose time,
    extrapolated from the model's previous one (quadratic for attention, linear otherwise), would
    exceed `max_seconds` is skipped, as are the points after a model's first failure or skip."""
    import json
    import subprocess

    rows = []
    for i, (arch, size) in enumerate(jobs):
        progress(i, len(jobs), f"{arch} {size:g}")
        previous = [r for r in rows if r["model"] == arch and r.get("time_s")]
        if previous:
            last, power = previous[-1], 2 if arch.startswith("ssast") else 1
            if last["time_s"] * (size / last[size_key]) ** power > max_seconds:
                rows.append({"model": arch, size_key: size, "time_s": None, "note": "skipped (predicted too slow)"})
                continue
        if any(r["model"] == arch and r.get("note") for r in rows):
            rows.append({"model": arch, size_key: size, "time_s": None, "note": "skipped"})
            continue
        result = subprocess.run([sys.executable, script, "--one", arch, str(size), *extra_args],
                                capture_output=True, text=True)
        if result.returncode:
            rows.append({"model": arch, size_key: size, "time_s": None,
                         "note": "failed: " + result.stderr.strip().splitlines()[-1][:80]})
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    progress(len(jobs), len(jobs), "done")
    return rows
