"""The compiled CPU selective scan's backward (hear_msm/ops/selective_scan.py) against autograd through the
PyTorch reference scan: outputs and all six gradients, a float64 gradcheck, the channel split
across threads, and a whole ssam_tiny training step.

Tolerances are relative (max |diff| / max |reference|), 1e-5 in float32 for the scan; the printed
numbers show how far below it each comparison is.
"""
import pytest
import torch

import hear_msm
from hear_msm.ops import selective_scan as scan_ops
from hear_msm.models.mamba import set_kernel
from hear_msm.ops.selective_scan import selective_scan_reference


TOLERANCE = 1e-5
NAMES = ("u", "delta", "A", "B", "C", "D")

pytestmark = [pytest.mark.numerics,
              pytest.mark.skipif(scan_ops.load_library() is None, reason="no C compiler to build the CPU scan")]


def _relative(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _inputs(batch, length, inner, nstate, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, inner, generator=gen, dtype=dtype)
    # softplus(dt) around the initialised range, plus a few large steps (decay ~0, the exp clamp)
    delta = torch.nn.functional.softplus(torch.randn(batch, length, inner, generator=gen, dtype=dtype) * 2 - 3)
    delta[0, length // 2, : inner // 2] = 30.0
    A = -torch.exp(torch.randn(inner, nstate, generator=gen, dtype=dtype))
    B = torch.randn(batch, length, nstate, generator=gen, dtype=dtype)
    C = torch.randn(batch, length, nstate, generator=gen, dtype=dtype)
    D = torch.randn(inner, generator=gen, dtype=dtype)
    return u, delta, A, B, C, D


def _output_and_gradients(scan, inputs, weights):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    y = scan(*leaves)
    (y * weights).sum().backward()  # a random linear loss: every output gets its own upstream gradient
    return y.detach(), [t.grad for t in leaves]


# small; the specialised nstate 16 loop; ssam_tiny's block shape (d_inner 576, d_state 24) at batch 2
@pytest.mark.parametrize("shape", [(2, 37, 12, 5), (3, 37, 96, 16), (2, 251, 576, 24)])
def test_compiled_backward_matches_reference_autograd(shape):
    inputs = _inputs(*shape)
    weights = torch.randn(shape[0], shape[1], shape[2], generator=torch.Generator().manual_seed(1))
    y, grads = _output_and_gradients(scan_ops.selective_scan_cpu_autograd, inputs, weights)
    y_ref, grads_ref = _output_and_gradients(selective_scan_reference, inputs, weights)
    diffs = {name: _relative(g, r) for name, g, r in zip(NAMES, grads, grads_ref)}
    print(shape, "output", _relative(y, y_ref), "gradients", diffs)
    assert _relative(y, y_ref) <= TOLERANCE
    assert max(diffs.values()) <= TOLERANCE
    assert all(g.dtype == torch.float32 and g.shape == t.shape for g, t in zip(grads, inputs))


def test_compiled_backward_gradcheck_float64():
    """float64 runs the same C loops instantiated for double (with libm's exp instead of the float
    polynomial), so finite differences check the adjoint recursion itself."""
    inputs = [t.requires_grad_(True) for t in _inputs(2, 9, 6, 3, dtype=torch.float64)]
    inputs[1].data[0, 4, :3] = 3.0  # moderately large steps (30 would leave nothing to check)
    assert torch.autograd.gradcheck(scan_ops.selective_scan_cpu_autograd, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_compiled_backward_some_inputs_without_gradients():
    u, delta, A, B, C, D = _inputs(1, 11, 8, 4)
    u.requires_grad_(True)
    scan_ops.selective_scan_cpu_autograd(u, delta, A, B, C, D).sum().backward()
    leaf = u.detach().clone().requires_grad_(True)
    selective_scan_reference(leaf, delta, A, B, C, D).sum().backward()
    assert _relative(u.grad, leaf.grad) <= TOLERANCE


def test_compiled_backward_threads_split_channels(monkeypatch):
    """Threads own channel ranges; dB and dC are per-thread partial sums added afterwards."""
    inputs = _inputs(2, 64, 576, 24)
    weights = torch.randn(2, 64, 576, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    y1, one = _output_and_gradients(scan_ops.selective_scan_cpu_autograd, inputs, weights)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    y3, three = _output_and_gradients(scan_ops.selective_scan_cpu_autograd, inputs, weights)
    assert torch.equal(y1, y3)
    for name, a, b in zip(NAMES, one, three):
        if name in ("B", "C"):  # summed in another order
            assert _relative(b, a) <= 1e-6, name
        else:  # each channel computed by exactly the same loop
            assert torch.equal(a, b), name


def test_ssam_tiny_training_step_gradients_compiled_equal_reference():
    """One reconstruction-loss step of the whole MaskedSpectrogramModel (as hear_msm/training/loop.py does
    it), gradients of every parameter with the compiled scan vs the PyTorch reference."""
    torch.manual_seed(0)
    model = hear_msm.create_model("ssam_tiny").train()
    # batch 1 keeps the reference's step (~4 s on one thread) short; batch > 1 is covered above
    spectrogram = torch.randn(1, 1, 200, 80, generator=torch.Generator().manual_seed(3))
    mask = model.sample_mask(1, 0.5, generator=torch.Generator().manual_seed(4))
    results = {}
    for kernel in ("cpu", "reference"):
        set_kernel(model, kernel)
        model.zero_grad(set_to_none=True)
        loss = model.reconstruction_loss(spectrogram, mask)
        loss.backward()
        results[kernel] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (loss, grads), (loss_ref, grads_ref) = results["cpu"], results["reference"]
    assert grads.keys() == grads_ref.keys() and any(".A_log" in n for n in grads)
    diffs = {n: _relative(grads[n], g) for n, g in grads_ref.items()}
    worst = max(diffs, key=diffs.get)
    print("ssam_tiny step: loss", loss, loss_ref, "worst gradient", worst, diffs[worst],
          "A_log", max(d for n, d in diffs.items() if n.endswith("A_log")))
    assert abs(loss - loss_ref) <= TOLERANCE * abs(loss_ref)
    assert diffs[worst] <= TOLERANCE  # measured ~1.4e-6 (batch 2): twelve blocks' roundings add up
