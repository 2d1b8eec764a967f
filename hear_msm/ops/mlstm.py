"""A compiled mLSTM layer and cell (parallel form) for CPU inference, built on first use with the system C compiler.

Why: xlstm's `parallel_stabilized_simple` builds the S x S gate matrix of every head in ~10
separate PyTorch passes (repeat, subtract a transposed copy, mask, add the input gates, row max,
subtract, exp, multiply by QK^T, row sum, divide), each writing a 4 x 251 x 251 tensor per clip:
more than half of AxLSTM-tiny's CPU time (benchmarks/README.md, note 12). The function, per head:

    logD[i, j] = (F[i+1] - F[j+1]) + ig[j]          j <= i, F = [0, cumsum(log sigmoid(fg))]
    m_i        = max_j logD[i, j]
    C[i, j]    = QK[i, j] * exp(logD[i, j] - m_i)    (0 above the diagonal)
    out[i, j]  = C[i, j] / (max(|sum_j C[i, j]|, exp(-m_i)) + eps),   h = out @ V

QK^T and out @ V stay PyTorch matmuls (oneDNN/MKL beat anything this small C file could do),
made by exactly xlstm's calls, and F by the same torch ops.

Two paths. The default (`mlstm_layer_cpu`, kernel "auto" / "fused") fuses the whole layer between
its two projections: conv + SiLU, the block-diagonal q/k/v projections and both gate projections
in one pass per token, the gate matrix in one pass per row that stays in L1 (our exp polynomial,
a 16-lane row sum), computed in row blocks whose matmuls skip most of the zero triangle, and
head norm + skip + output gate in one pass per token (in double, rounded once). Its float32
rounding differs from xlstm's, and its error against a float64 run is no larger than xlstm's
own float32 form's on the whole model (tests/test_fused_defaults.py).
The exact path (`mlstm_parallel_cpu(exact=True)`, kernel "cpu", inside xlstm's own layer
forward): bit-identical to xlstm's float32 cell. C writes the stabilised log weights of the
causal triangle, packed, and weighs QK^T in place; exp, the row sum, normaliser and division stay
PyTorch ops on xlstm's shapes. It was the default while parity meant "the same bits as the
fixtures" (benchmarks/README.md, note 12).
The C is compiled WITHOUT -ffast-math and with -ffp-contract=off: the exact path's subtractions,
adds, products and divisions must round exactly as PyTorch's elementwise ops do; the reductions
are vectorised by hand (16 independent lanes; max is order-free, so still exact).

Same build scheme as `selective_scan` (cached under `$HEAR_MSM_CACHE`, default ~/.cache/hear_msm,
keyed by a hash of source and flags; no compiler -> one warning and xlstm's PyTorch form).
Forward only.
"""
from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .compiled import CompiledKernel, c_entry_point, require_float32

_SOURCE = Path(__file__).with_name("csrc") / "mlstm.c"

def _compile_flags() -> list[str]:
    # no -ffast-math: the elementwise arithmetic must round like PyTorch's (module docstring);
    # -fno-math-errno / -fno-trapping-math only let gcc vectorise, they do not change results
    flags = ["-O3", "-fPIC", "-std=c99", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    if capability == "AVX512":
        flags += ["-mavx512f", "-mprefer-vector-width=512"]
    return flags


def _declare(library: ctypes.CDLL) -> None:
    library.hear_msm_mlstm_gates.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long, ctypes.c_float] + [ctypes.c_long] * 2
    library.hear_msm_mlstm_log_weights.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3
    library.hear_msm_mlstm_weigh.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 3
    library.hear_msm_mlstm_gates_parallel.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long, ctypes.c_float] + \
        [ctypes.c_long] * 2
    library.hear_msm_mlstm_log_weights_parallel.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3
    library.hear_msm_mlstm_weigh_parallel.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 3
    library.hear_msm_mlstm_gates_rows.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 4 + [ctypes.c_float] + \
        [ctypes.c_long] * 2
    library.hear_msm_mlstm_gates_rows_parallel.argtypes = library.hear_msm_mlstm_gates_rows.argtypes
    library.hear_msm_mlstm_layer_in.argtypes = [ctypes.c_void_p] * 13 + [ctypes.c_long] * 5 + [ctypes.c_float] + \
        [ctypes.c_long] * 2
    library.hear_msm_mlstm_layer_in_parallel.argtypes = library.hear_msm_mlstm_layer_in.argtypes
    library.hear_msm_mlstm_forget_cumsum.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 4
    library.hear_msm_mlstm_forget_cumsum_parallel.argtypes = library.hear_msm_mlstm_forget_cumsum.argtypes
    library.hear_msm_mlstm_layer_out.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_long] * 2 + [ctypes.c_float] + \
        [ctypes.c_long] * 2
    library.hear_msm_mlstm_layer_out_parallel.argtypes = library.hear_msm_mlstm_layer_out.argtypes
    for name in ("gates", "log_weights", "weigh", "gates_rows", "layer_in", "forget_cumsum", "layer_out"):
        getattr(library, f"hear_msm_mlstm_{name}").restype = None
        getattr(library, f"hear_msm_mlstm_{name}_parallel").restype = None


_KERNEL = CompiledKernel("mlstm_gates", _SOURCE, _compile_flags, _declare,
                         what="CPU mLSTM kernel", fallback="xlstm's PyTorch parallel form", openmp=True)
load_library = _KERNEL.load
_thread_pool = _KERNEL.thread_pool


KERNELS = ("auto", "cpu", "fused", "reference")


def resolve(kernel: str, tensor_is_cuda: bool, needs_grad: bool, kernel_loader=None) -> str:
    """The one dispatch decision of the mLSTM layer: "fused" (the compiled layer, `mlstm_layer_cpu`),
    "cpu" (xlstm's layer around the compiled exact cell) or "reference" (xlstm's PyTorch form).

    `auto` takes "fused" for CPU tensors when no gradient is needed and the kernel builds; `cpu` and
    `fused` demand the kernel (ValueError on CUDA tensors, with gradients, or when it cannot be
    built); `reference` never takes it. The compiled kernel is forward-only.
    """
    if kernel == "reference" or (kernel == "auto" and (tensor_is_cuda or needs_grad)):
        return "reference"
    if kernel not in KERNELS:
        raise ValueError(f"mLSTM kernel must be one of {KERNELS}, got {kernel!r}")
    if tensor_is_cuda:
        raise ValueError(f"kernel={kernel!r} needs CPU tensors; use kernel='auto' on a GPU")
    if needs_grad:
        raise ValueError(f"kernel={kernel!r} is forward-only (inference); use kernel='auto' or 'reference' "
                         "to train, or run under torch.no_grad()")
    available = (kernel_loader or load_library)() is not None
    if kernel != "auto" and not available:
        raise ValueError(f"kernel={kernel!r} needs a C compiler (cc/gcc) to build the CPU mLSTM kernel on "
                         "first use; use kernel='auto' or 'reference'")
    return ("fused" if kernel == "auto" else kernel) if available else "reference"


@c_entry_point
def mlstm_parallel_cpu(queries, keys, values, igate_preact, fgate_preact, eps: float = 1e-6,
                       exact: bool = True, **unused):
    """mLSTM cell in parallel form, the function of xlstm's `parallel_stabilized_simple`; no autograd.

    queries, keys, values: [B, NH, S, DH], any strides (xlstm passes head views of [B, S, NH * DH]
    tensors); igate_preact, fgate_preact: [B, NH, S, 1] (float32, CPU). Returns h [B, NH, S, DH]
    as a view of a time-major [B, S, NH, DH] tensor, the layout xlstm's head norm reads next.

    exact=True: bit-identical to xlstm's float32 result. C builds the packed log weights and
    weighs QK^T; exp, the row sum, the normaliser and the division stay PyTorch ops on tensors
    of xlstm's shapes (their rounding, and the sum's order, are PyTorch's).
    exact=False: everything between the two matmuls in one C pass per row (faster; our exp and
    sum order: ~1e-7 relative per cell, but the whole model can amplify that to ~2e-5:
    benchmarks/README.md, note 12).
    The two matmuls are xlstm's `bmm`s, one per clip on strided head views instead of on packed
    copies (same bits, see tests; with `headwise_projection` the whole forward is ~1.2x faster,
    benchmarks/README.md note 13).
    """
    library = load_library()
    if library is None:
        raise RuntimeError("the compiled CPU mLSTM kernel is not available")
    require_float32("the compiled mLSTM cell", queries=queries, keys=keys, values=values, igate_preact=igate_preact,
                    fgate_preact=fgate_preact)
    batch, heads, length, dim = queries.shape
    count = batch * heads
    with torch.no_grad():
        # the same torch calls as xlstm for everything outside the gate matrix: same bits
        log_fgates = F.logsigmoid(fgate_preact)
        fcum = torch.cat([log_fgates.new_zeros(batch, heads, 1, 1), torch.cumsum(log_fgates, dim=-2)], dim=-2)
        fcum = fcum.reshape(count, length + 1).contiguous()
        igate = igate_preact.reshape(count, length).contiguous()
        keys = keys / math.sqrt(dim)
        scores = queries.new_empty(batch, heads, length, length)
        for clip in range(batch):
            torch.bmm(queries[clip], keys[clip].transpose(-2, -1), out=scores[clip])
        if exact:
            weights = queries.new_empty(count, length * (length + 1) // 2)
            row_max = queries.new_empty(batch, heads, length, 1)
            _run(library.hear_msm_mlstm_log_weights, count, length,
                 weights.data_ptr(), row_max.data_ptr(), fcum.data_ptr(), igate.data_ptr(), length)
            weights.exp_()  # PyTorch's exp: its rounding is the reference's (elementwise, position-free)
            _run(library.hear_msm_mlstm_weigh, count, length, scores.data_ptr(), weights.data_ptr(), length)
            normaliser = torch.maximum(scores.sum(dim=-1, keepdim=True).abs(), torch.exp(-row_max))
            scores.div_(normaliser + eps)
        else:
            _run(library.hear_msm_mlstm_gates, count, length,
                 scores.data_ptr(), fcum.data_ptr(), igate.data_ptr(), length, eps)
        hidden = queries.new_empty(batch, length, heads, dim)
        for clip in range(batch):
            torch.bmm(scores[clip], values[clip], out=hidden[clip].transpose(0, 1))
        return hidden.transpose(1, 2)


@c_entry_point
def mlstm_layer_cpu(up: torch.Tensor, conv_weight, conv_bias, q_weight, k_weight, v_weight, gate_weight, gate_bias,
                    norm_weight, skip, num_heads: int, norm_eps: float, eps: float = 1e-6,
                    row_blocks: int = 3) -> torch.Tensor:
    """xlstm's `mLSTMLayer` between `proj_up` and `proj_down`, fused for CPU inference; no autograd.

    up [B, L, 2 D]: proj_up's output (x_mlstm, then z); conv_weight [D, 1, K], conv_bias [D] or
    None: the causal depthwise conv; q/k/v_weight [D / bs, bs, bs]: the block-diagonal projections
    (xlstm's `LinearHeadwiseExpand`, no bias); gate_weight [2 NH, 3 D], gate_bias [2 NH]: input
    then forget gate of the cell; norm_weight [D]: the head norm's scale (1 + weight; xlstm's head
    norm has no bias); skip [D]: the learnable skip. Returns h [B, L, D], the input of proj_down:

        act = silu(conv(x_mlstm)); h = (headnorm(cell(q(act), k(act), v(x_mlstm))) + skip * act) * silu(z)

    Three C passes (`hear_msm_mlstm_layer_in`, `_forget_cumsum`, `_layer_out`) around the fused
    cell (`mlstm_parallel_cpu(exact=False)`'s gate pass between its two per-clip matmuls), instead
    of ~20 PyTorch ops and their intermediate tensors; the gate matrix in `row_blocks` row blocks
    whose matmuls skip most of its zero triangle. Float32 tensors with our exp and sum orders; the
    log-sigmoid cumsum, head norm, skip and SiLUs computed in double and rounded once. Its error
    against a float64 run is tested per layer and on the whole model (tests/test_fused_defaults.py).
    """
    library = load_library()
    if library is None:
        raise RuntimeError("the compiled CPU mLSTM kernel is not available")
    require_float32("the fused mLSTM layer", up=up, conv_weight=conv_weight, conv_bias=conv_bias, q_weight=q_weight,
                    k_weight=k_weight, v_weight=v_weight, gate_weight=gate_weight, gate_bias=gate_bias,
                    norm_weight=norm_weight, skip=skip)
    batch, length, two_d = up.shape
    dim = two_d // 2
    block_size = q_weight.shape[1]
    kernel_size = conv_weight.shape[-1]
    head_dim = dim // num_heads
    with torch.no_grad():
        up = up.contiguous()
        # weights in the layouts the C passes read (a few KB: rearranged per call)
        conv_t = conv_weight.reshape(dim, kernel_size).t().contiguous()  # [K, D]
        by_input = [w.permute(2, 0, 1).reshape(block_size, dim).contiguous() for w in (q_weight, k_weight, v_weight)]
        gate_weight, gate_bias = gate_weight.contiguous(), gate_bias.contiguous()
        act, q, k, v = (up.new_empty(batch, length, dim) for _ in range(4))
        gates = up.new_empty(batch * length, 2 * num_heads)
        tokens = batch * length
        _run(library.hear_msm_mlstm_layer_in, tokens, length, up.data_ptr(), conv_t.data_ptr(),
             None if conv_bias is None else conv_bias.contiguous().data_ptr(),
             *(w.data_ptr() for w in by_input), gate_weight.data_ptr(), gate_bias.data_ptr(),
             act.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), gates.data_ptr(),
             length, dim, kernel_size, block_size, 2 * num_heads, 1.0 / math.sqrt(head_dim))
        count = batch * num_heads
        igate = up.new_empty(count, length)
        fcum = up.new_empty(count, length + 1)
        _run(library.hear_msm_mlstm_forget_cumsum, count, length, gates.data_ptr(), igate.data_ptr(),
             fcum.data_ptr(), length, num_heads)
        heads = [t.view(batch, length, num_heads, head_dim).transpose(1, 2) for t in (q, k, v)]
        hidden = up.new_empty(batch, length, num_heads, head_dim)
        # the gate matrix in row blocks, each against the columns up to its last row only: the
        # matmuls skip most of the zero triangle above the diagonal
        bounds = [length * b // row_blocks for b in range(row_blocks + 1)]
        for row0, row1 in zip(bounds[:-1], bounds[1:]):
            if row1 == row0:
                continue
            scores = up.new_empty(batch, num_heads, row1 - row0, row1)
            for clip in range(batch):
                torch.bmm(heads[0][clip, :, row0:row1], heads[1][clip, :, :row1].transpose(-2, -1), out=scores[clip])
            _run(library.hear_msm_mlstm_gates_rows, count, length, scores.data_ptr(), fcum.data_ptr(),
                 igate.data_ptr(), length, row0, row1 - row0, row1, eps)
            for clip in range(batch):
                torch.bmm(scores[clip], heads[2][clip, :, :row1], out=hidden[clip, row0:row1].transpose(0, 1))
        out = up.new_empty(batch, length, dim)
        _run(library.hear_msm_mlstm_layer_out, tokens, length, hidden.data_ptr(), up.data_ptr(), act.data_ptr(),
             norm_weight.contiguous().data_ptr(), skip.contiguous().data_ptr(), out.data_ptr(), dim, num_heads,
             norm_eps)
        return out


def headwise_projection(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """xlstm's `LinearHeadwiseExpand` (block-diagonal projection) without its layout copies; no autograd.

    inputs [..., NH * d]; weight [NH, o, d]: out[..., h, o] = sum_d inputs[..., h, d] weight[h, o, d].
    xlstm's einsum runs this as one `bmm` over heads on a head-major copy of the inputs and then
    copies the result back to token-major order; here the same `bmm` reads the inputs in place and
    writes its result straight into token-major order (same bits; 0.72 vs 1.14 ms at [5, 251, 384]).
    """
    heads, out_per_head, in_per_head = weight.shape
    lead = inputs.shape[:-1]
    by_head = inputs.reshape(-1, heads, in_per_head).transpose(0, 1)  # [NH, N, d], a view when possible
    out = inputs.new_empty(lead.numel(), heads, out_per_head)
    torch.bmm(by_head, weight.transpose(1, 2), out=out.transpose(0, 1))
    out = out.view(*lead, heads * out_per_head)
    return out if bias is None else out + bias


def _run(function, count: int, length: int, *args) -> None:
    """function(*args, begin, end) over heads [0, count), split over threads (each owns its rows):
    on PyTorch's OpenMP team through the `_parallel` entry point when the library has OpenMP,
    else on a pool (ctypes releases the GIL)."""
    threads = max(1, min(torch.get_num_threads(), count))
    if threads == 1 or length < 32:
        function(*args, 0, count)
        return
    if _KERNEL.uses_openmp:
        getattr(load_library(), function.__name__ + "_parallel")(*args, count, threads)
        return
    bounds = [count * t // threads for t in range(threads + 1)]
    pool = _thread_pool(threads)
    for job in [pool.submit(function, *args, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]:
        job.result()


def mlstm_blockwise(queries, keys, values, igate_preact, fgate_preact, state=None, block_tokens: int = 64,
                    eps: float = 1e-6, **unused):
    """mLSTM cell, blockwise form (xlstm calls it "chunkwise"): the function of xlstm's
    `parallel_stabilized_simple`, linear in S, exact attention inside blocks of `block_tokens`.

    queries, keys, values: [B, NH, S, DH]; igate_preact, fgate_preact: [B, NH, S, 1];
    state: None or (C [B, NH, DH, DH], n [B, NH, DH], m [B, NH]) from a previous segment, with C
    and n stored divided by exp(m). Returns h [B, NH, S, DH], or (h, state) when `state` is given
    (pass `state=()` to start a carried sequence).
    """
    batch, heads, length, dim = queries.shape
    carry = state is not None
    keys = keys / math.sqrt(dim)
    log_f = F.logsigmoid(fgate_preact.squeeze(-1))  # [B, NH, S]
    igate = igate_preact.squeeze(-1)
    if state:
        c_mem, n_mem, m_mem = state
    else:
        c_mem = queries.new_zeros(batch, heads, dim, dim)
        n_mem = queries.new_zeros(batch, heads, dim)
        m_mem = queries.new_full((batch, heads), -math.inf)
    outputs = []
    for start in range(0, length, block_tokens):
        stop = min(start + block_tokens, length)
        q, k, v = queries[:, :, start:stop], keys[:, :, start:stop], values[:, :, start:stop]
        cum = torch.cumsum(log_f[:, :, start:stop], dim=-1)  # [B, NH, T] forget sum since block start
        size = stop - start
        causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
        # log weight of token j for row i: sum of log f over (j, i] + i_j; of the memory: cum_i + m
        log_d = (cum[..., :, None] - cum[..., None, :] + igate[:, :, None, start:stop]).masked_fill(~causal, -math.inf)
        log_mem = cum + m_mem[..., None]  # [B, NH, T]
        m_row = torch.maximum(log_d.amax(dim=-1), log_mem)  # = the parallel form's row max
        d_mat = torch.exp(log_d - m_row[..., None])
        mem_scale = torch.exp(log_mem - m_row)[..., None]  # [B, NH, T, 1]
        scores = (q @ k.transpose(-2, -1)) * d_mat  # [B, NH, T, T]
        numerator = scores @ v + mem_scale * (q @ c_mem)
        normaliser = scores.sum(dim=-1, keepdim=True) + mem_scale * (q @ n_mem[..., None])
        normaliser = torch.maximum(normaliser.abs(), torch.exp(-m_row)[..., None])
        outputs.append(numerator / (normaliser + eps))
        if stop == length and not carry:
            break
        # memory at the block end, stabilised by its own maximum
        log_w = cum[..., -1:] - cum + igate[:, :, start:stop]  # [B, NH, T]
        m_new = torch.maximum(cum[..., -1] + m_mem, log_w.amax(dim=-1))
        decay = torch.exp(cum[..., -1] + m_mem - m_new)[..., None]  # [B, NH, 1]
        weights = torch.exp(log_w - m_new[..., None])[..., None]  # [B, NH, T, 1]
        c_mem = decay[..., None] * c_mem + (k * weights).transpose(-2, -1) @ v
        n_mem = decay * n_mem + (k * weights).sum(dim=-2)
        m_mem = m_new
    h = torch.cat(outputs, dim=2) if outputs else queries.new_zeros(batch, heads, 0, dim)
    return (h, (c_mem, n_mem, m_mem)) if carry else h
