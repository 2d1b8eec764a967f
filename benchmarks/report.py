#!/usr/bin/env python3
"""Print the markdown tables of every results/*.json (used to refresh benchmarks/README.md).

    python benchmarks/report.py [benchmarks/results]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from _util import table

COLUMNS = {
    "throughput": ["threads", "batch", "model", "mode", "x_realtime", "vs_ssast_tiny", "vs_hear1", "vs_official"],
    "seqlen": ["model", "seconds_audio", "tokens", "time_s", "x_realtime", "peak_mb", "time_vs_1min", "mem_vs_1min", "note"],
    "flops": ["threads", "what", "kernel", "gflops", "of_matmul", "of_matmul_median", "x_realtime", "vs_first"],
    "full_vs_chunked": ["task", "seconds", "model", "setting", "top1", "chroma"],
    "train_step": ["model", "kernel", "batch", "threads", "step_s", "first_step_s", "peak_rss_mb"],
    "eval_workers": ["round", "workers", "threads_per_worker", "jobs", "wall_s", "cpu_s", "speedup", "load_before",
                     "load_after"],
}


def main():
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        kind = next((k for k in COLUMNS if path.stem.startswith(k)), None)
        if kind is None:
            print(f"### {path.name}\n\n(no table layout for it in report.py)\n")
            continue
        machine = data["machine"]
        print(f"### {path.name}\n\n{machine['time']}, load average at start {machine['load_average_at_start']}, "
              f"torch {machine['torch']}, {machine['cpu_count']} CPUs ({machine['cpu_capability']})"
              + (f", {machine['cpu_vendor']} {machine['cpu_model']} (family {machine['cpu_family']}; "
                 f"{' '.join(machine['cpu_flags'])})" if machine.get("cpu_model") else "")
              + (f", clock {data['clock']}" if data.get("clock") else "") + "\n")
        print(table(data["rows"], COLUMNS[kind]) + "\n")


if __name__ == "__main__":
    main()
