"""The Transformer block's oneDNN inference path (`TransformerBlock.forward_onednn`) against the
plain PyTorch block, under the float64-anchored policy of tests/numerics.py: its float32 error
against a float64 run of the reference block is at most FACTOR x the reference's own float32
error (+ a floor far below any real mistake); a deliberately wrong variant (tanh GELU in place
of the exact one) must fail that bound. Also: the dispatch (`resolve`), and that training and
gradients never take the path.
"""
import copy

import pytest
import torch

import hear_msm
from hear_msm.ops import onednn
from hear_msm.models.transformer import TransformerBlock, TransformerConfig, resolve, set_kernel
from numerics import FACTOR, assert_float64_anchored, max_abs_error

pytestmark = pytest.mark.numerics

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="PyTorch without oneDNN")

FLOOR = 1e-7  # the tanh-GELU mistake below is ~1e-4; float32 rounding of a block is ~1e-6


def _block(width: int, gelu: str = "none", kernel: str = "auto", seed: int = 0) -> TransformerBlock:
    """A block with non-trivial biases and norms (the initialisation zeroes biases)."""
    config = TransformerConfig(arch="test", embed_dim=width, depth=1, num_heads=width // 64)
    torch.manual_seed(seed)
    block = TransformerBlock(config, gelu, kernel=kernel)
    block.reset_parameters()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return block.eval()


def _run(block: TransformerBlock, x: torch.Tensor, kernel: str) -> torch.Tensor:
    block = copy.deepcopy(block)
    block.kernel = kernel
    with torch.no_grad():
        return block(x)


def _inputs(batch: int, width: int, seed: int = 1) -> torch.Tensor:
    return 2.0 * torch.randn(batch, 251, width, generator=torch.Generator().manual_seed(seed))


@needs_onednn
@pytest.mark.parametrize("width,gelu,kernel", [(192, "none", "auto"), (192, "tanh", "auto"), (384, "none", "onednn")])
@pytest.mark.parametrize("batch", [1, 4])
def test_onednn_block_is_float64_anchored(width, gelu, kernel, batch):
    block, x = _block(width, gelu), _inputs(batch, width)
    ours, theirs = _run(block, x, kernel), _run(block, x, "reference")
    reference = _run(copy.deepcopy(block).double(), x.double(), "reference")
    print(f"width {width}, {gelu} GELU, batch {batch}: bit-identical to the reference here: "
          f"{torch.equal(ours, theirs)}")
    assert_float64_anchored(f"block {width} {gelu}", ours, theirs, reference, floor=FLOOR)


@needs_onednn
def test_the_bound_catches_tanh_gelu():
    """The mistake the parity test must see: the tanh approximation where the model has exact GELU."""
    block, x = _block(192), _inputs(4, 192)
    theirs = _run(block, x, "reference")
    reference = _run(copy.deepcopy(block).double(), x.double(), "reference")
    wrong = copy.deepcopy(block)
    wrong.mlp.gelu_approximate = "tanh"
    wrong = _run(wrong, x, "onednn")
    bound = FACTOR * max_abs_error(theirs, reference) + FLOOR
    error = max_abs_error(wrong, reference)
    print(f"tanh GELU on the onednn path: error vs float64 {error:.3g}, bound {bound:.3g}")
    assert error > 10 * bound
    with pytest.raises(AssertionError, match="exceeds"):
        assert_float64_anchored("tanh GELU", wrong, theirs, reference, floor=FLOOR)


@needs_onednn
@pytest.mark.parametrize("arch", ["ssast_tiny", "mwmae_tiny"])
def test_whole_encoder_is_float64_anchored(arch, monkeypatch):
    calls = []
    fused = TransformerBlock.forward_onednn
    monkeypatch.setattr(TransformerBlock, "forward_onednn", lambda self, x: calls.append(1) or fused(self, x))
    torch.manual_seed(0)
    model = hear_msm.create_model(arch).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    x = torch.randn(3, 1, 200, 80, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.forward_features(x)  # auto: oneDNN blocks
        set_kernel(model, "reference")
        theirs = model.forward_features(x)
        reference = copy.deepcopy(model).double().forward_features(x.double())
    assert len(calls) == model.config.depth  # the default took the oneDNN path in every block, once
    print(f"{arch}: bit-identical to the reference here: {torch.equal(ours, theirs)}")
    assert_float64_anchored(arch, ours, theirs, reference, floor=FLOOR)


def test_resolve():
    x32, x64 = torch.zeros(1, 3, 192), torch.zeros(1, 3, 192, dtype=torch.float64)
    wide = torch.zeros(1, 3, 384)
    expected = "onednn" if onednn.available() else "reference"
    assert resolve("auto", x32, needs_grad=False) == expected
    assert resolve("auto", x32, needs_grad=True) == "reference"
    assert resolve("auto", x64, needs_grad=False) == "reference"
    assert resolve("auto", wide, needs_grad=False) == "reference"  # wider: ATen's blocked sums are more accurate
    assert resolve("reference", x32, needs_grad=False) == "reference"
    with pytest.raises(ValueError, match="gradients"):
        resolve("onednn", x32, needs_grad=True)
    with pytest.raises(ValueError, match="float64"):
        resolve("onednn", x64, needs_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resolve("auto", x32, needs_grad=False) == "reference"
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)  # what torch.backends.mkldnn.flags(enabled=False) sets (it also warns)
    try:
        assert resolve("auto", x32, needs_grad=False) == "reference"
    finally:
        torch._C._set_mkldnn_enabled(enabled)
    with pytest.raises(ValueError, match="kernel must be one of"):
        resolve("fused", x32, needs_grad=False)
    with pytest.raises(ValueError, match="kernel must be one of"):
        hear_msm.create_model("ssast_tiny", kernel="cpu")


def test_compiled_graphs_trace_the_reference(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert resolve("auto", torch.zeros(1, 3, 192), needs_grad=False) == "reference"


def test_without_onednn_auto_falls_back(monkeypatch):
    monkeypatch.setattr(onednn, "available", lambda: False)
    x = torch.zeros(1, 3, 192)
    assert resolve("auto", x, needs_grad=False) == "reference"
    with pytest.raises(ValueError, match="no oneDNN"):
        resolve("onednn", x, needs_grad=False)


def test_gradients_take_the_reference(monkeypatch):
    """With gradients the block is the reference, bit for bit, even with kernel='auto'."""
    block, x = _block(192), _inputs(2, 192)
    monkeypatch.setattr(TransformerBlock, "forward_onednn", lambda self, x: pytest.fail("onednn path with gradients"))
    outputs = []
    for kernel in ("auto", "reference"):
        b = copy.deepcopy(block)
        b.kernel = kernel
        out = b(x)
        out.square().sum().backward()
        outputs.append((out.detach(), [p.grad for p in b.parameters()]))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outputs[0][1], outputs[1][1]))


def test_set_kernel_leaves_windowed_decoder_blocks_alone():
    from hear_msm.models.mwmae import MultiWindowDecoder, MultiWindowDecoderConfig

    decoder = MultiWindowDecoder(MultiWindowDecoderConfig(embed_dim=128, depth=1, num_heads=2,
                                                          window_sizes=(0, 2)), 192, 250, 64)
    set_kernel(decoder, "onednn")
    assert all(block.kernel == "reference" for block in decoder.decoder_blocks)
