#!/usr/bin/env python3
"""Time and peak memory of one SSAM pretraining step on CPU: PyTorch reference scan vs compiled scan.

One step as hear_msm/train.py does it (fp32 on CPU): random normalised log-mel crops
[batch, 1, 200, 80], an unstructured 50% mask, the MaskedSpectrogramModel's reconstruction loss,
backward, AdamW step. Each kernel runs in a fresh subprocess so that peak RSS (ru_maxrss) is that
kernel's alone; `step_s` is the minimum over `--repeats` steps after one warm-up step.

    python benchmarks/train_step.py --threads 1 --out benchmarks/results/train_step.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def one_kernel(arch: str, kernel: str, batch: int, repeats: int, threads: int) -> dict:
    import hear_msm
    from hear_msm.models.mamba import set_kernel
    from _util import peak_rss_mb

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = hear_msm.create_model(arch).train()
    set_kernel(model, kernel)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    spectrogram = torch.randn(batch, 1, 200, 80)
    base = peak_rss_mb()
    times, losses = [], []
    for step in range(repeats + 1):
        mask = model.sample_mask(batch, 0.5, generator=torch.Generator().manual_seed(step))
        start = time.perf_counter()
        loss = model.reconstruction_loss(spectrogram, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"model": arch, "kernel": kernel, "batch": batch, "threads": threads, "step_s": min(times[1:]),
            "first_step_s": times[0], "peak_rss_mb": peak_rss_mb(), "peak_above_model_mb": peak_rss_mb() - base,
            "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ssam_tiny")
    parser.add_argument("--kernels", nargs="+", default=["reference", "cpu"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", nargs=2, metavar=("ARCH", "KERNEL"), help=argparse.SUPPRESS)  # subprocess
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_kernel(args.one[0], args.one[1], args.batch, args.repeats, args.threads)))
        return
    from _util import table, write_json

    rows = []
    for kernel in args.kernels:
        command = [sys.executable, __file__, "--one", args.model, kernel, "--batch", str(args.batch),
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]
        result = subprocess.run(command, check=True, capture_output=True, text=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"{kernel}: {rows[-1]['step_s']:.2f} s/step, peak {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
    print(table(rows, ["model", "kernel", "batch", "threads", "step_s", "first_step_s", "peak_rss_mb",
                       "peak_above_model_mb"]))
    if args.out:
        write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
