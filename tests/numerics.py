"""The tolerance policy of every parity test: float32 error judged against a float64 reference.

Two float32 implementations of the same function never agree bit for bit across CPUs (vendor FFT
and BLAS paths, ATen's dispatch level, compiler vectorisation), so no test compares them directly.
Each parity test instead runs (or loads) a float64 reference and asserts

    error(ours_float32, reference_float64) <= FACTOR * error(theirs_float32, reference_float64) + floor

where "theirs" is the implementation being replaced or reproduced (the authors' code, xlstm's cell,
the PyTorch reference scan) run in float32. That is: hear_msm is as close to exact as the reference
implementation itself is, within a small factor, on whatever CPU the test runs. `floor` is an
absolute allowance for references whose own float32 error happens to be ~0 on some machine; it is
chosen far below the error of any real mistake (tests/test_parity_official.py shows the margins).
"""
from __future__ import annotations

import torch

FACTOR = 4.0


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: scale-free, for inputs of arbitrary magnitude."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def assert_float64_anchored(label: str, ours: torch.Tensor, theirs: torch.Tensor, reference: torch.Tensor,
                            floor: float, factor: float = FACTOR, error=max_abs_error) -> float:
    """Assert the policy above; print both errors and the bound; return the bound."""
    assert ours.shape == reference.shape == theirs.shape, (ours.shape, theirs.shape, reference.shape)
    assert reference.dtype == torch.float64, f"{label}: the reference must be float64, got {reference.dtype}"
    ours_error, their_error = error(ours, reference), error(theirs, reference)
    bound = factor * their_error + floor
    print(f"{label}: ours vs float64 {ours_error:.3g}; theirs (float32) vs float64 {their_error:.3g}; "
          f"bound {bound:.3g}")
    assert ours_error <= bound, (
        f"{label}: hear_msm's float32 error {ours_error:.3g} exceeds {factor} x the reference "
        f"implementation's own float32 error {their_error:.3g} + {floor:.1g}"
    )
    return bound
