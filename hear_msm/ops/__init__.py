"""Sequence operators with more than one implementation, each behind one `resolve(kernel, ...)`.

- `selective_scan`: Mamba's scan. PyTorch reference; compiled CPU scan with a compiled backward
  (`csrc/selective_scan.c`); mamba-ssm's fused CUDA kernel when installed and on a GPU.
- `mlstm`: the mLSTM cell. xlstm's PyTorch parallel form (reference); a compiled CPU gate kernel
  for inference (`csrc/mlstm.c`); a blockwise form, linear in length, for long sequences.
- `onednn`: whether a float32 inference Linear takes oneDNN's inner product (with fused epilogues
  for SSAST's block; SSAM's in_proj) instead of ATen's GEMM: decided once for every family.
- `compiled`: builds, caches and loads the C sources with the system compiler, and runs their
  thread split on PyTorch's OpenMP team.

Each op's `resolve` validates the kernel name for that op and returns the path that will run; the
callers branch once on its answer. Every fast path has a parity test against its reference.
"""
