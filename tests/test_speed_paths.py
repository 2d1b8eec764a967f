"""Parity of the fast paths with their references: the compiled CPU selective scan (its backward:
tests/test_scan_backward.py), the blockwise mLSTM, segment streaming with carried state, and the
HEAR full-sequence mode.

Tolerances are relative (max |diff| / max |reference|) in float32, 1e-5 as in the issue; the
printed numbers show how far below it each path is. Where a fast path replaces another float32
implementation (the compiled mLSTM cell, the head-wise projections), the two are never compared
bit for bit: both are judged against a float64 run (tests/numerics.py), as BLAS and compilers
round differently on every CPU. Bit-identity is asserted only where the same code runs twice
(thread splits, segmentation of one kernel's input).
"""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from xlstm.blocks.mlstm.backends import parallel_stabilized_simple

import hear_msm
from hear_msm.ops import mlstm as mlstm_ops
from hear_msm.ops import selective_scan as scan_ops
from hear_msm.models.encoder import sincos_2d_position_table
from hear_msm._hear import HearModel
from hear_msm.models.mamba import MambaConfig, MambaMixer, set_kernel
from hear_msm.ops.selective_scan import selective_scan_reference, use_cpu_kernel
from hear_msm.models.xlstm import set_mlstm_form, set_mlstm_kernel
from hear_msm.ops.mlstm import mlstm_blockwise
from hear_msm.ops.mlstm import resolve as resolve_mlstm
from numerics import assert_float64_anchored, relative_error

pytestmark = pytest.mark.numerics

TOLERANCE = 1e-5

needs_compiler = pytest.mark.skipif(scan_ops.load_library() is None, reason="no C compiler to build the CPU scan")


def _relative(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _scan_inputs(batch, length, inner, nstate, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, inner, generator=gen)
    # softplus(dt) with dt around the initialised range, plus a few large steps (exp(-87) clamp)
    delta = torch.nn.functional.softplus(torch.randn(batch, length, inner, generator=gen) * 2 - 3)
    delta[0, length // 2, : inner // 2] = 30.0
    A = -torch.exp(torch.randn(inner, nstate, generator=gen))
    B, C = torch.randn(batch, length, nstate, generator=gen), torch.randn(batch, length, nstate, generator=gen)
    D = torch.randn(inner, generator=gen)
    return u, delta, A, B, C, D


# ----------------------------------------------------------------------------- compiled scan
# (batch, L, E, N): the channel-blocked form (N 16 or 24, E a multiple of 16), blocks plus
# per-channel tail channels (E = 100, 600), and the per-channel form only (N = 7)
@needs_compiler
@pytest.mark.parametrize("shape", [(1, 251, 576, 24), (3, 37, 96, 16), (2, 50, 130, 7), (2, 40, 100, 24),
                                   (1, 30, 600, 16)])
def test_cpu_scan_matches_reference(shape):
    inputs = _scan_inputs(*shape)
    expected = selective_scan_reference(*inputs)
    actual, state = scan_ops.selective_scan_cpu(*inputs)
    diff = _relative(actual, expected)
    print(shape, "compiled scan vs reference, relative", diff)
    assert diff <= TOLERANCE
    assert state.shape == (shape[0], shape[2], shape[3])


@needs_compiler
@pytest.mark.parametrize("shape", [(2, 60, 576, 24), (1, 33, 100, 16), (2, 20, 40, 7)])
def test_cpu_scan_gate_matches_reference(shape):
    """The output gate computed in the scan's loop: y * silu(z), z read in place from rows of 2 E
    floats (in_proj's output split in two), judged against float64."""
    inputs = _scan_inputs(*shape)
    batch, length, inner, _ = shape
    gate = 3 * torch.randn(batch, length, 2 * inner, generator=torch.Generator().manual_seed(9))[..., inner:]
    gate[0, 0, 0] = -200.0  # silu's far tail: e^200 overflows float32 unless clamped
    exact = selective_scan_reference(*(t.double() for t in inputs)) * F.silu(gate.double())
    ungated, _ = scan_ops.selective_scan_cpu(*inputs)
    ours, _ = scan_ops.selective_scan_cpu(*inputs, gate=gate)
    assert torch.isfinite(ours).all()
    assert_float64_anchored(f"gated scan {shape}", ours, ungated * F.silu(gate), exact, floor=1e-6,
                            error=relative_error)


@needs_compiler
def test_cpu_scan_refuses_a_gate_of_another_shape():
    inputs = _scan_inputs(2, 10, 32, 16)
    with pytest.raises(ValueError, match="gate must have u's shape"):
        scan_ops.selective_scan_cpu(*inputs, gate=torch.randn(2, 10, 16))


@needs_compiler
def test_cpu_scan_carries_state_across_segments():
    u, delta, A, B, C, D = _scan_inputs(2, 90, 64, 24)
    whole, final = scan_ops.selective_scan_cpu(u, delta, A, B, C, D)
    state, pieces = None, []
    for start, stop in [(0, 1), (1, 40), (40, 90)]:
        piece, state = scan_ops.selective_scan_cpu(u[:, start:stop], delta[:, start:stop], A,
                                                    B[:, start:stop], C[:, start:stop], D, state)
        pieces.append(piece)
    assert torch.equal(torch.cat(pieces, dim=1), whole)
    assert torch.equal(state, final)


@needs_compiler
@pytest.mark.parametrize("inner", [576, 600])  # 600: 37 channel blocks and 8 channels of per-channel tail
def test_cpu_scan_threads_split_channels_exactly(monkeypatch, inner):
    inputs = _scan_inputs(2, 64, inner, 24)
    gate = torch.randn(2, 64, inner)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    one, one_state = scan_ops.selective_scan_cpu(*inputs, gate=gate)
    for threads in (2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        split, split_state = scan_ops.selective_scan_cpu(*inputs, gate=gate)
        assert torch.equal(one, split) and torch.equal(one_state, split_state)


def _mixer(seed=0):
    torch.manual_seed(seed)
    mixer = MambaMixer(MambaConfig(arch="t", embed_dim=64), kernel="auto")
    mixer.reset_parameters(depth=2)
    return mixer


@needs_compiler
def test_mixer_auto_uses_compiled_scan_with_and_without_gradients(monkeypatch):
    mixer = _mixer()
    x = torch.randn(2, 251, 64)
    with torch.no_grad():
        fast = mixer(x)
        set_kernel(mixer, "reference")
        reference = mixer(x)
        set_kernel(mixer, "auto")
    diff = _relative(fast, reference)
    print("mixer auto (compiled) vs reference, relative", diff)
    assert diff <= TOLERANCE
    # with gradients, auto takes the compiled forward + backward (parity: tests/test_scan_backward.py)
    calls = []
    original = scan_ops.selective_scan_cpu_autograd
    monkeypatch.setattr(scan_ops, "selective_scan_cpu_autograd", lambda *a: calls.append(1) or original(*a))
    mixer(x.clone().requires_grad_(True)).square().sum().backward()
    assert calls == [1]


@needs_compiler
def test_kernel_reference_is_pure_pytorch_with_and_without_gradients(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("kernel='reference' called the compiled scan")

    monkeypatch.setattr(scan_ops, "selective_scan_cpu", refuse)
    monkeypatch.setattr(scan_ops, "selective_scan_cpu_autograd", refuse)
    mixer = _mixer()
    set_kernel(mixer, "reference")
    mixer(torch.randn(1, 8, 64, requires_grad=True)).sum().backward()
    with torch.no_grad():
        assert torch.isfinite(mixer(torch.randn(1, 8, 64))).all()


@needs_compiler
def test_kernel_cpu_trains():
    mixer = _mixer()
    set_kernel(mixer, "cpu")
    x = torch.randn(1, 8, 64, requires_grad=True)
    mixer(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(mixer.A_log.grad).all()


def test_cpu_kernel_dispatch():
    present, absent = (lambda: object()), (lambda: None)
    assert use_cpu_kernel("auto", False, present) is True  # with or without gradients: compiled backward
    assert use_cpu_kernel("auto", False, absent) is False
    assert use_cpu_kernel("cpu", False, present) is True
    assert use_cpu_kernel("reference", False, present) is False
    assert use_cpu_kernel("auto", True, present) is False  # CUDA tensors: never
    with pytest.raises(ValueError, match="compiler"):
        use_cpu_kernel("cpu", False, absent)
    with pytest.raises(ValueError, match="CPU tensors"):
        use_cpu_kernel("cpu", True, present)


@needs_compiler
def test_whole_ssam_auto_equals_reference():
    torch.manual_seed(0)
    model = hear_msm.create_model("ssam_tiny").eval()
    x = torch.randn(2, 1, 200, 80)
    with torch.no_grad():
        fast = model.forward_features(x)
        set_kernel(model, "reference")
        reference = model.forward_features(x)
    diff = _relative(fast, reference)
    print("ssam_tiny auto vs reference, relative", diff)
    assert diff <= TOLERANCE


# ----------------------------------------------------------------------------- blockwise mLSTM
def _mlstm_inputs(length, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, length, 24, generator=gen, dtype=dtype) for _ in range(3))
    igate = torch.randn(2, 4, length, 1, generator=gen, dtype=dtype)
    fgate = 3 + 2 * torch.randn(2, 4, length, 1, generator=gen, dtype=dtype)
    return q, k, v, igate, fgate


@pytest.mark.parametrize("length", [1, 64, 65, 251, 700])
def test_blockwise_mlstm_matches_parallel_form(length):
    inputs = _mlstm_inputs(length)
    exact = parallel_stabilized_simple(*(t.double() for t in inputs))  # float64 ground truth
    blockwise = mlstm_blockwise(*inputs)
    parallel = parallel_stabilized_simple(*inputs)
    diff, parallel_diff = _relative(blockwise, exact), _relative(parallel, exact)
    print(length, "blockwise vs parallel(fp64)", diff, "parallel fp32 vs fp64", parallel_diff,
          "blockwise vs parallel fp32", _relative(blockwise, parallel))
    assert diff <= TOLERANCE
    assert _relative(blockwise, parallel) <= 2 * TOLERANCE  # both float32: their errors add


def test_blockwise_mlstm_gradients_match_parallel_form():
    """Against the float64 parallel form: the float32 parallel form's own gradient error is ~1e-5."""
    weights = torch.randn(2, 4, 251, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def gradients(function, dtype):
        inputs = [t.to(dtype).requires_grad_(True) for t in _mlstm_inputs(251)]
        (function(*inputs) * weights.to(dtype)).sum().backward()
        return [t.grad for t in inputs]

    exact = gradients(parallel_stabilized_simple, torch.float64)
    blockwise = [_relative(a, b) for a, b in zip(gradients(mlstm_blockwise, torch.float32), exact)]
    parallel = [_relative(a, b) for a, b in zip(gradients(parallel_stabilized_simple, torch.float32), exact)]
    print("gradients vs parallel fp64 (q, k, v, i, f): blockwise", blockwise, "parallel fp32", parallel)
    assert max(blockwise) <= TOLERANCE


def test_blockwise_mlstm_carries_state_across_segments():
    inputs = _mlstm_inputs(300)
    whole = mlstm_blockwise(*inputs)
    state, pieces = (), []
    for start, stop in [(0, 10), (10, 200), (200, 300)]:
        piece, state = mlstm_blockwise(*(t[:, :, start:stop] for t in inputs), state=state)
        pieces.append(piece)
    diff = _relative(torch.cat(pieces, dim=2), whole)
    print("segmented vs one pass, relative", diff)
    assert diff <= TOLERANCE


# ----------------------------------------------------------------------------- streaming blocks
@pytest.mark.parametrize("arch", ["ssam_tiny", "axlstm_tiny"])
def test_blocks_streamed_in_segments_equal_their_forward(arch):
    torch.manual_seed(0)
    model = hear_msm.create_model(arch).eval()
    x = torch.randn(2, 251, 192)
    segments = [(0, 1), (1, 100), (100, 251)]
    for block in model.blocks[:2]:  # AxLSTM: one forward and one reversed block
        with torch.no_grad():
            expected = block(x)
            out, state = torch.empty_like(x), None
            for start, stop in reversed(segments) if getattr(block, "reverse", False) else segments:
                out[:, start:stop], state = block.forward_stream(x[:, start:stop], state)
        diff = _relative(out, expected)
        print(arch, "reverse" if getattr(block, "reverse", False) else "forward", "streamed vs forward", diff)
        assert diff <= TOLERANCE


# ----------------------------------------------------------------------------- full-sequence HEAR mode
def _audio(clips, seconds, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(clips, int(16000 * seconds), generator=gen)


@pytest.mark.parametrize("arch", ["ssam_tiny", "axlstm_tiny"])
def test_full_sequence_equals_chunked_on_one_chunk(arch):
    """A 2 s clip is one chunk: both modes encode the same 251-token sequence."""
    torch.manual_seed(0)
    encoder = hear_msm.create_model(arch)
    audio = _audio(2, 2.0)
    chunked, times = HearModel(encoder).timestamp_embeddings(audio)
    full, full_times = HearModel(encoder, sequence="full", segment_tokens=37).timestamp_embeddings(audio)
    diff = _relative(full, chunked)
    print(arch, "full vs chunked on 2 s", diff)
    assert diff <= TOLERANCE and torch.equal(times, full_times)


@pytest.mark.parametrize("arch", ["ssam_tiny", "axlstm_tiny"])
def test_full_sequence_shapes_and_segment_independence(arch):
    torch.manual_seed(0)
    encoder = hear_msm.create_model(arch)
    audio = _audio(2, 5.3)
    small = HearModel(encoder, sequence="full", segment_tokens=64)
    large = HearModel(encoder, sequence="full", segment_tokens=100_000)
    embeddings, timestamps = small.timestamp_embeddings(audio)
    reference, reference_times = HearModel(encoder).timestamp_embeddings(audio)
    assert embeddings.shape == reference.shape and torch.equal(timestamps, reference_times)
    diff = _relative(embeddings, large.timestamp_embeddings(audio)[0])
    print(arch, "segment 64 vs one segment", diff)
    assert diff <= TOLERANCE
    assert torch.allclose(small.scene_embeddings(audio), embeddings.mean(dim=1), atol=1e-5)
    # clips do not depend on their batch
    single, _ = small.timestamp_embeddings(audio[1:])
    assert _relative(single[0], embeddings[1]) <= TOLERANCE


def test_full_sequence_is_refused_where_it_does_not_apply():
    encoder = hear_msm.create_model("ssast_tiny")
    with pytest.raises(ValueError, match="recurrent"):
        HearModel(encoder, sequence="full")
    with pytest.raises(ValueError, match="layout"):
        HearModel(hear_msm.create_model("ssam_tiny"), sequence="full", layout="official")
    with pytest.raises(ValueError, match="sequence"):
        HearModel(encoder, sequence="whole")


def test_position_table_extends_the_analytic_table_and_tiles_others():
    encoder = hear_msm.create_model("ssam_tiny")  # initialised with the analytic table
    stored = encoder.pos_embed[0]
    assert torch.equal(encoder.position_table(50), stored)
    long = encoder.position_table(120)
    assert torch.equal(long, sincos_2d_position_table(192, 120, 5))
    assert torch.equal(long[: stored.shape[0]], stored)  # time-major: the first 2 s are unchanged
    with torch.no_grad():
        encoder.pos_embed.add_(0.01 * torch.randn_like(encoder.pos_embed))  # no longer analytic
    tiled = encoder.position_table(120)
    assert torch.equal(tiled[1:251], encoder.pos_embed[0, 1:]) and torch.equal(tiled[251:501], encoder.pos_embed[0, 1:])
    assert torch.equal(tiled[501:], encoder.pos_embed[0, 1:101])


def test_whole_axlstm_blockwise_equals_xlstm_parallel_forward():
    """The opt-in blockwise form against xlstm's own layer forward (the default), outputs and gradients."""
    torch.manual_seed(0)
    model = hear_msm.create_model("axlstm_tiny")
    x = torch.randn(2, 1, 200, 80)
    weights = torch.randn(2, 250, 192)  # a random linear loss: the LayerNormed outputs' norm is constant
    results = {}
    for form in ("blockwise", "parallel"):
        set_mlstm_form(model, form)
        model.zero_grad()
        out = model.forward_features(x)
        (out * weights).sum().backward()
        results[form] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (fast, fast_grads), (reference, reference_grads) = results["blockwise"], results["parallel"]
    diff = _relative(fast, reference)
    grad_diff = max(_relative(fast_grads[n], g) for n, g in reference_grads.items())
    print("axlstm_tiny blockwise vs parallel: output", diff, "worst gradient", grad_diff)
    assert diff <= TOLERANCE and grad_diff <= TOLERANCE
    assert fast_grads.keys() == reference_grads.keys()


def test_axlstm_default_block_is_xlstms_layer_in_its_direction():
    """Each block is x + mLSTMLayer(norm(x)) read forward (even blocks) or reversed (odd blocks),
    with xlstm's own layer as the float32 reference and its float64 run as the anchor."""
    torch.manual_seed(0)
    model = hear_msm.create_model("axlstm_tiny").eval()
    x = torch.randn(2, 251, 192)
    with torch.no_grad():
        for block in model.blocks[:2]:
            default = block(x)
            set_mlstm_kernel(block, "reference")  # xlstm's own cell backend, untouched

            def xlstm_block(inputs):
                h = block.norm(inputs)
                return inputs + (block.layer(h.flip(1)).flip(1) if block.reverse else block.layer(h))

            expected = xlstm_block(x)
            block.double()
            expected64 = xlstm_block(x.double())
            block.float()
            # residual blocks: compare the branch, not x + branch (x itself carries no error)
            assert_float64_anchored(f"block reverse={block.reverse}", default - x, expected - x, expected64 - x.double(),
                                    floor=1e-6, error=relative_error)
            wrong_direction = x + block.layer(block.norm(x).flip(1)).flip(1) if not block.reverse \
                else x + block.layer(block.norm(x))
            assert relative_error(wrong_direction - x, expected64 - x.double()) > 1e-2  # the direction matters
    with pytest.raises(ValueError, match="form"):
        set_mlstm_form(model, "fast")
    with pytest.raises(ValueError, match="kernel"):
        set_mlstm_kernel(model, "cuda")


# ----------------------------------------------------------------------------- compiled mLSTM cell
needs_mlstm_kernel = pytest.mark.skipif(mlstm_ops.load_library() is None,
                                        reason="no C compiler to build the CPU mLSTM kernel")


def _cell_inputs(batch, length, seed, extreme=False):
    """AxLSTM-tiny's cell shapes (4 heads of 96), gates as in `_mlstm_inputs`; `extreme`: forget
    gates from near 0 to strong decay and input gates wide enough that some stabilised log weights
    fall below exp's float32 range (-87); ill-conditioned (xlstm's float32 form is then up to
    ~4e-3 from float64), so only used for the bit-for-bit check."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, 4, length, 96, generator=gen) for _ in range(3))
    igate = torch.randn(batch, 4, length, 1, generator=gen) * (12 if extreme else 1)
    fgate = (2 + 3 * torch.randn(batch, 4, length, 1, generator=gen)) if extreme else \
        (3 + 2 * torch.randn(batch, 4, length, 1, generator=gen))
    return q, k, v, igate, fgate


@needs_mlstm_kernel
@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 64, 100, 250, 251])
def test_cpu_mlstm_kernel_matches_xlstm_parallel_form(length):
    """Default (exact) path: as close to a float64 run as xlstm's own float32 form is (the same
    operations in the same order, so on most CPUs the very same bits). Opt-in fused path: within
    1e-5 relative of xlstm's float32 form."""
    for extreme in (False, True):
        inputs = _cell_inputs(2, length, seed=length, extreme=extreme)
        float64 = parallel_stabilized_simple(*(t.double() for t in inputs))
        assert_float64_anchored(f"exact kernel, length {length}, extreme {extreme}", mlstm_ops.mlstm_parallel_cpu(*inputs),
                                parallel_stabilized_simple(*inputs), float64, floor=1e-6, error=relative_error)
    inputs = _cell_inputs(2, length, seed=length)
    reference = parallel_stabilized_simple(*inputs)
    fused = mlstm_ops.mlstm_parallel_cpu(*inputs, exact=False)
    float64 = parallel_stabilized_simple(*(t.double() for t in inputs))
    diff = _relative(fused, reference)
    print(length, "fused vs xlstm fp32", diff, "fused vs fp64", _relative(fused, float64),
          "xlstm fp32 vs fp64", _relative(reference, float64))
    assert diff <= TOLERANCE


@needs_mlstm_kernel
@pytest.mark.parametrize("batch,length", [(1, 251), (3, 100), (2, 7)])
def test_cpu_mlstm_kernel_reads_head_views_in_place(batch, length):
    """xlstm's cell hands over head views of [B, S, NH * DH] tensors (strided, not packed): the
    kernel's per-clip matmuls read those views in place (as accurately as xlstm's float32 form), and
    its output is a head view of a time-major tensor, so xlstm's head norm reads it without a copy."""
    gen = torch.Generator().manual_seed(batch * length)
    q, k, v = (torch.randn(batch, length, 4 * 96, generator=gen).view(batch, length, 4, 96).transpose(1, 2)
               for _ in range(3))
    igate = torch.randn(batch, 4, length, 1, generator=gen)
    fgate = 3 + 2 * torch.randn(batch, 4, length, 1, generator=gen)
    assert not q.is_contiguous()
    out = mlstm_ops.mlstm_parallel_cpu(q, k, v, igate, fgate)
    float64 = parallel_stabilized_simple(*(t.double() for t in (q, k, v, igate, fgate)))
    assert_float64_anchored(f"head views {batch}x{length}", out, parallel_stabilized_simple(q, k, v, igate, fgate),
                            float64, floor=1e-6, error=relative_error)
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("lead,heads,block,bias", [((2, 251), 96, 4, False), ((3,), 8, 2, True), ((1, 5, 7), 4, 8, False)])
def test_headwise_projection_equals_xlstm_einsum(lead, heads, block, bias):
    from xlstm.components.linear_headwise import LinearHeadwiseExpand, LinearHeadwiseExpandConfig

    torch.manual_seed(heads)
    projection = LinearHeadwiseExpand(LinearHeadwiseExpandConfig(in_features=heads * block, num_heads=heads, bias=bias))
    if bias:
        nn.init.normal_(projection.bias)
    x = torch.randn(*lead, heads * block)
    strided = torch.randn(heads * block, *lead).movedim(0, -1)  # a non-contiguous input too
    with torch.no_grad():
        for inputs in (x, strided):
            expected = projection(inputs)
            projection.double()
            float64 = projection(inputs.double())
            projection.float()
            assert_float64_anchored(f"head-wise projection {lead}", mlstm_ops.headwise_projection(
                inputs, projection.weight, projection.bias), expected, float64, floor=1e-6, error=relative_error)


@needs_mlstm_kernel
def test_cpu_mlstm_kernel_threads_split_heads_exactly(monkeypatch):
    inputs = _cell_inputs(3, 251, seed=7, extreme=True)
    single = [mlstm_ops.mlstm_parallel_cpu(*inputs, exact=exact) for exact in (True, False)]
    monkeypatch.setattr(mlstm_ops.torch, "get_num_threads", lambda: 5)  # 12 heads over 5 threads
    split = [mlstm_ops.mlstm_parallel_cpu(*inputs, exact=exact) for exact in (True, False)]
    assert all(torch.equal(a, b) for a, b in zip(single, split))


@needs_mlstm_kernel
def test_whole_axlstm_exact_cell_is_as_accurate_as_xlstm_and_gradients_use_xlstm(monkeypatch):
    """kernel="cpu": xlstm's layer around the exact compiled cell (the default before the fused layer,
    tests/test_fused_defaults.py)."""
    torch.manual_seed(0)
    model = hear_msm.create_model("axlstm_tiny", kernel="cpu").eval()
    x = torch.randn(2, 1, 200, 80)
    calls = []
    kernel = mlstm_ops.mlstm_parallel_cpu
    monkeypatch.setattr(mlstm_ops, "mlstm_parallel_cpu", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    with torch.no_grad():
        fast = model.forward_features(x)
        assert len(calls) == len(model.blocks)
        set_mlstm_kernel(model, "reference")
        reference = model.forward_features(x)
    assert len(calls) == len(model.blocks)
    model.double()
    with torch.no_grad():
        float64 = model.forward_features(x.double())
    model.float()
    assert_float64_anchored("axlstm_tiny exact compiled cell", fast, reference, float64, floor=1e-6,
                            error=relative_error)
    # with gradients, auto takes xlstm's PyTorch form
    set_mlstm_kernel(model, "auto")
    model.forward_features(x).sum().backward()
    assert len(calls) == len(model.blocks)
    set_mlstm_kernel(model, "cpu")
    with pytest.raises(ValueError, match="forward-only"):
        model.forward_features(x)


def test_cpu_mlstm_kernel_dispatch():
    present, absent = (lambda: object()), (lambda: None)
    assert resolve_mlstm("auto", False, False, present) == "fused"  # the fused layer (tests/test_fused_defaults.py)
    assert resolve_mlstm("auto", False, False, absent) == "reference"
    assert resolve_mlstm("auto", False, True, present) == "reference"  # gradients: xlstm's form
    assert resolve_mlstm("auto", True, False, present) == "reference"  # CUDA tensors: never
    assert resolve_mlstm("reference", False, False, present) == "reference"
    assert resolve_mlstm("cpu", False, False, present) == "cpu"
    assert resolve_mlstm("fused", False, False, present) == "fused"
    with pytest.raises(ValueError, match="auto.*cpu.*fused.*reference"):
        resolve_mlstm("cuda", False, False, present)  # SSAM's option: refused, not ignored
    with pytest.raises(ValueError, match="compiler"):
        resolve_mlstm("cpu", False, False, absent)
    with pytest.raises(ValueError, match="CPU tensors"):
        resolve_mlstm("fused", True, False, present)
    with pytest.raises(ValueError, match="forward-only"):
        resolve_mlstm("cpu", False, True, present)


@pytest.mark.parametrize("positions", ["extend", "tile"])
def test_position_rows_are_slices_of_the_long_table(positions):
    encoder = hear_msm.create_model("axlstm_tiny")
    table = encoder.position_table(300, positions)
    for start, stop in [(0, 1), (0, 37), (1, 600), (251, 1501)]:
        assert torch.equal(encoder.position_rows(start, stop, positions), table[start:stop])


# ----------------------------------------------------------------------------- OpenMP builds
_OPENMP_PROBE = r"""
int has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
"""


def _probe_kernel(folder):
    import ctypes

    from hear_msm.ops.compiled import CompiledKernel

    def declare(library):
        library.has_openmp.restype = ctypes.c_int
    source = folder / "openmp_probe.c"
    source.write_text(_OPENMP_PROBE)
    return CompiledKernel("openmp_probe", source, lambda: ["-O1", "-fPIC"], declare,
                          what="probe", fallback="nothing", openmp=True)


def test_openmp_kernels_share_pytorchs_team_or_build_sequential(tmp_path, monkeypatch):
    """With PyTorch's libgomp loaded, openmp kernels build with -fopenmp and load no second
    OpenMP runtime; a compiler without -fopenmp gives a working sequential build instead."""
    from hear_msm.ops.compiled import CompiledKernel

    monkeypatch.setenv("HEAR_MSM_CACHE", str(tmp_path / "cache"))
    probe = _probe_kernel(tmp_path)
    library = probe.load()
    assert library.has_openmp() == int(probe.uses_openmp)  # the flag says what the build did
    if CompiledKernel._torch_uses_libgomp():
        assert probe.uses_openmp
        scan_ops.load_library(), mlstm_ops.load_library()
        assert scan_ops._KERNEL.uses_openmp and mlstm_ops._KERNEL.uses_openmp
        runtimes = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}
        assert len(runtimes) == 1, runtimes
    compiler = tmp_path / "cc-without-openmp"
    compiler.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec gcc "$@"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("HEAR_MSM_CACHE", str(tmp_path / "cache2"))
    sequential = _probe_kernel(tmp_path)
    assert sequential.load().has_openmp() == 0 and not sequential.uses_openmp


C_SOURCES = sorted((Path(hear_msm.__file__).parent / "ops" / "csrc").glob("*.c"))


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
@pytest.mark.parametrize("source", C_SOURCES, ids=lambda path: path.name)
@pytest.mark.parametrize("openmp", [False, True], ids=["sequential", "openmp"])
def test_c_sources_compile_without_warnings(source, openmp, tmp_path):
    """The shipped C sources build with every warning an error, with and without OpenMP."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    flags = ["-std=c99", "-O2", "-fPIC", "-Wall", "-Wextra", "-Werror"] + (["-fopenmp"] if openmp else [])
    result = subprocess.run([compiler, *flags, "-c", str(source), "-o", str(tmp_path / "kernel.o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
