"""The LSQ quantizer against its definition: forward, closed-form step gradient, code counts, errors."""
import math

import pytest
import torch

from qvit_export import QuantConfig, QvitError
from qvit_export.lsq import LSQQuantizer, code_range


def _quantizer(bits, signed, step):
    q = LSQQuantizer(bits, tuple(step.shape), signed=signed, name="t")
    q.set_step(step)
    return q


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_forward_is_clamped_rounding_times_step(bits, signed):
    torch.manual_seed(bits)
    x = torch.randn(64, 50, 96) * 3
    step = torch.tensor(0.37)
    qmin, qmax = code_range(bits, signed)
    expected = torch.clamp(torch.round(x / step), qmin, qmax) * step
    q = _quantizer(bits, signed, step)
    assert torch.equal(q(x), expected)
    assert torch.equal(q.int_codes(x).float() * step, expected)
    assert q.int_codes(x).dtype == torch.int32


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_forward_is_exact_for_any_step(bits):
    """The gradient-scaling trick must leave the step bit-exact, or outputs drift from the integer codes."""
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(4096, generator=gen) * 4
    qmin, qmax = code_range(bits, True)
    for step in torch.rand(300, generator=gen) * 2 + 1e-3:
        q = _quantizer(bits, True, step)
        assert torch.equal(q(x), torch.clamp(torch.round(x / step), qmin, qmax) * step), float(step)


def test_code_ranges_fit_int8_with_zero_point_zero():
    assert code_range(4, True) == (-8, 7)
    assert code_range(2, True) == (-2, 1)
    assert code_range(3, False) == (0, 7)
    assert code_range(8, True) == (-128, 127)
    assert code_range(8, False) == (0, 127)  # TensorRT has no UINT8 quantization


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_per_channel_forward(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 40)
    step = torch.rand(16, 1) * 0.2 + 0.01
    qmin, qmax = code_range(bits, True)
    q = _quantizer(bits, True, step)
    assert torch.equal(q(w), torch.clamp(torch.round(w / step), qmin, qmax) * step)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_step_gradient_equals_lsq_closed_form(bits, per_channel):
    torch.manual_seed(bits + 10 * per_channel)
    x = (torch.randn(8, 32) * 2).requires_grad_(True)
    step = torch.rand(8, 1) * 0.3 + 0.05 if per_channel else torch.tensor(0.21)
    q = _quantizer(bits, True, step)
    upstream = torch.randn_like(x)
    (q(x) * upstream).sum().backward()

    qmin, qmax = code_range(bits, True)
    v = x.detach() / step
    inside = (v >= qmin) & (v <= qmax)
    local = torch.where(inside, torch.round(v) - v, torch.where(v < qmin, float(qmin), float(qmax)))
    n = x.numel() / (8 if per_channel else x.shape[0])  # elements sharing one step
    g = 1 / math.sqrt(n * qmax)
    expected_ds = (upstream * local).sum(dim=1, keepdim=True) * g if per_channel else (upstream * local).sum() * g
    torch.testing.assert_close(q.step.grad, expected_ds.reshape(q.step.shape), rtol=1e-5, atol=1e-6)
    # straight-through estimator: dx passes inside the range, is zero outside
    torch.testing.assert_close(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_at_most_two_to_the_bits_distinct_values(bits, signed):
    x = torch.linspace(-50, 50, 100_001)
    q = _quantizer(bits, signed, torch.tensor(0.05))
    values = q(x).unique()
    assert len(values) <= 2**bits
    if signed:
        assert len(values) == 2**bits  # the range is used in full
    w = torch.randn(12, 500) * 5
    qc = _quantizer(bits, True, torch.rand(12, 1) + 0.1)
    assert max(len(row.unique()) for row in qc(w)) <= 2**bits


@pytest.mark.parametrize("bits", [1, 5, 9, 0, "4", 4.0, True])
def test_unsupported_bits_are_refused_in_one_line(bits):
    for make in (lambda: LSQQuantizer(bits), lambda: QuantConfig(w_bits=bits), lambda: QuantConfig(a_bits=bits)):
        with pytest.raises(QvitError) as err:
            make()
        assert "2, 3, 4, 8" in str(err.value) and "\n" not in str(err.value)


def test_uncalibrated_quantizer_says_to_calibrate():
    with pytest.raises(QvitError, match="calibrate"):
        LSQQuantizer(4, name="blocks.0.mlp.fc1.input_quantizer")(torch.randn(2, 3))


def test_disabled_quantizer_is_identity():
    q = _quantizer(2, True, torch.tensor(1.0))
    q.enabled = False
    x = torch.randn(100)
    assert q(x) is x


def test_a_quantizer_says_its_role_and_granularity():
    """Role and granularity are fields set where the quantizer is made, which calibration, parity and export read;
    a step shape that contradicts the granularity is refused."""
    from qvit_export import QuantConfig, QvitError, create_model, quantize, quantizers
    from qvit_export.lsq import ACTIVATION, WEIGHT, PerChannel, PerTensor

    named = dict(quantizers(quantize(create_model("test_vit"), QuantConfig())))
    for name, q in named.items():
        is_weight = name.endswith("weight_quantizer")
        assert q.role == (WEIGHT if is_weight else ACTIVATION)
        assert q.granularity == (PerChannel(axis=0) if is_weight else PerTensor())
        assert (q.step.dim() >= 2) == is_weight  # [out, 1, ...] broadcast over the weight, a scalar otherwise
    assert "weight, per-channel" in repr(named["blocks.0.attn.qkv.weight_quantizer"])
    with pytest.raises(QvitError, match="a tensor step cannot have the shape"):
        LSQQuantizer(4, (8, 1), name="w", role=WEIGHT, granularity=PerTensor())
    with pytest.raises(QvitError, match="role 'bias'"):
        LSQQuantizer(4, name="b", role="bias")


@pytest.mark.parametrize("bits", [2, 4])
def test_per_block_forward_and_step_gradient(bits):
    """One step per block of 16 inputs of each of 8 channels: the forward is clamped rounding with each element's
    own block step, each block's step gradient is the LSQ closed form summed over its 16 elements (N = 16), and the
    integer codes are those of that step."""
    from qvit_export.lsq import WEIGHT, PerBlock

    torch.manual_seed(bits)
    x = (torch.randn(8, 64) * 2).requires_grad_(True)
    step = torch.rand(8, 4) * 0.3 + 0.05
    q = LSQQuantizer(bits, (8, 4), name="w", role=WEIGHT, granularity=PerBlock(axis=1, size=16))
    q.set_step(step)
    full = step.repeat_interleave(16, dim=1)
    qmin, qmax = code_range(bits, True)
    assert torch.equal(q(x.detach()), torch.clamp(torch.round(x.detach() / full), qmin, qmax) * full)
    assert torch.equal(q.int_codes(x.detach()), torch.clamp(torch.round(x.detach() / full), qmin, qmax).int())
    upstream = torch.randn_like(x)
    (q(x) * upstream).sum().backward()
    v = x.detach() / full
    inside = (v >= qmin) & (v <= qmax)
    local = torch.where(inside, torch.round(v) - v, torch.where(v < qmin, float(qmin), float(qmax)))
    expected = (upstream * local).reshape(8, 4, 16).sum(dim=2) / math.sqrt(16 * qmax)
    torch.testing.assert_close(q.step.grad, expected, rtol=1e-5, atol=1e-6)
    assert "weight, per-block of 16" in repr(q)
    with pytest.raises(QvitError, match="a block step cannot have the shape"):
        LSQQuantizer(4, (8, 1, 1, 1), name="w", role=WEIGHT, granularity=PerBlock(axis=1, size=16))


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_training_and_evaluation_forwards_are_the_same_bits(granularity):
    """Under autograd the quantizer runs its autograd Function (which keeps what LSQ's backward needs); without it,
    plain ops: both give the same values bit for bit, at every granularity."""
    from qvit_export.lsq import WEIGHT, PerBlock

    torch.manual_seed(3)
    x = torch.randn(8, 64) * 2
    if granularity == "block":
        q = LSQQuantizer(2, (8, 4), name="w", role=WEIGHT, granularity=PerBlock(axis=1, size=16))
        q.set_step(torch.rand(8, 4) * 0.3 + 0.05)
    else:
        q = _quantizer(2, True, torch.rand(8, 1) * 0.3 + 0.05 if granularity == "channel" else torch.tensor(0.3))
    trained = q(x.clone().requires_grad_(True))
    assert trained.grad_fn is not None
    with torch.no_grad():
        evaluated = q(x)
    assert evaluated.grad_fn is None and torch.equal(trained.detach(), evaluated)
