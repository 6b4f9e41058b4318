"""Each variant of the residual family against its equation, written out by hand."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rskip import SKIP_VARIANTS, SkipOptions, create_skip

D = 6


def ln(z, norm):
    return F.layer_norm(z, (D,), norm.weight, norm.bias, norm.eps)


def bn_train(z, norm):
    mean, var = z.mean(0), z.var(0, unbiased=False)
    return (z - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def make(variant, **options):
    torch.manual_seed(0)
    skip = create_skip(SkipOptions(skip_variant=variant, **options), D)
    with torch.no_grad():  # distinct affine parameters, so a norm used in the wrong place shows
        for p in skip.parameters():
            if p.ndim:
                p.copy_(torch.randn_like(p))
    return skip


@pytest.fixture
def xh():
    torch.manual_seed(1)
    return torch.randn(5, D), torch.randn(5, D)


def test_plain(xh):
    x, h = xh
    skip = make("plain")
    assert list(skip.parameters()) == []
    assert torch.equal(skip(x, h), x + h)
    assert torch.equal(skip.branch_input(x), x)


def test_post_ln(xh):
    x, h = xh
    skip = make("post_ln")
    torch.testing.assert_close(skip(x, h), ln(x + h, skip))


def test_pre_ln(xh):
    x, h = xh
    skip = make("pre_ln")
    torch.testing.assert_close(skip.branch_input(x), ln(x, skip))
    assert torch.equal(skip(x, h), x + h)


def test_xskip(xh):
    x, h = xh
    skip = make("xskip", skip_scale=0.5)
    assert list(skip.parameters()) == []
    torch.testing.assert_close(skip(x, h), 0.5 * x + h)


def test_xskip_ln(xh):
    x, h = xh
    skip = make("xskip_ln", skip_scale=2.0)
    torch.testing.assert_close(skip(x, h), ln(2.0 * x + h, skip))


@pytest.mark.parametrize("recursions", [1, 2, 3])
def test_rskip_ln(xh, recursions):
    x, h = xh
    skip = make("rskip_ln", skip_recursions=recursions)
    norms = [skip, *skip.recursion_norms]
    assert len(norms) == recursions
    y = h
    for norm in norms:
        y = ln(x + y, norm)
    torch.testing.assert_close(skip(x, h), y)


def test_rskip_ln_k2_is_the_papers_headline_form(xh):
    x, h = xh
    skip = make("rskip_ln", skip_recursions=2)
    ln1, ln2 = skip, skip.recursion_norms[0]
    torch.testing.assert_close(skip(x, h), ln(x + ln(x + h, ln1), ln2))


def test_rskip_ln_shared_norm(xh):
    x, h = xh
    skip = make("rskip_ln", skip_recursions=3, skip_share_norm=True)
    assert len(skip.recursion_norms) == 0
    torch.testing.assert_close(skip(x, h), ln(x + ln(x + ln(x + h, skip), skip), skip))


def test_xskip_bn(xh):
    x, h = xh
    skip = make("xskip_bn", skip_scale=0.7).train()
    torch.testing.assert_close(skip(x, h), bn_train(0.7 * x + h, skip))


def test_rskip_bn(xh):
    x, h = xh
    skip = make("rskip_bn", skip_recursions=2).train()
    bn1, bn2 = skip, skip.recursion_norms[0]
    torch.testing.assert_close(skip(x, h), bn_train(x + bn_train(x + h, bn1), bn2))


def test_bn_variants_use_running_statistics_in_eval(xh):
    x, h = xh
    skip = make("rskip_bn", skip_recursions=2)
    skip.train()(x, h)
    skip.eval()
    assert skip.num_batches_tracked.item() == 1
    expected = h
    for norm in (skip, skip.recursion_norms[0]):
        z = x + expected
        expected = (z - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
    torch.testing.assert_close(skip(x, h), expected)


@pytest.mark.parametrize("variant", ["xskip", "xskip_ln", "xskip_bn"])
def test_learnable_scale_starts_at_lambda_and_learns(xh, variant):
    x, h = xh
    skip = make(variant, skip_scale=0.5, skip_learnable_scale=True)
    assert isinstance(skip.scale, nn.Parameter) and skip.scale.ndim == 0
    assert skip.scale.item() == 0.5
    skip(x, h).square().sum().backward()
    assert skip.scale.grad is not None and skip.scale.grad.item() != 0


def test_norms_start_as_identity_affine():
    skip = create_skip(SkipOptions(skip_variant="rskip_ln", skip_recursions=3), D)
    for norm in (skip, *skip.recursion_norms):
        assert torch.equal(norm.weight, torch.ones(D)) and torch.equal(norm.bias, torch.zeros(D))


def test_host_norm_classes_are_used():
    skip = create_skip(SkipOptions(skip_variant="rskip_bn", skip_recursions=2), D, bn_layer=nn.BatchNorm1d)
    assert isinstance(skip, nn.BatchNorm1d) and isinstance(skip.recursion_norms[0], nn.BatchNorm1d)
    skip = create_skip(SkipOptions(skip_variant="post_ln"), D, ln_layer=nn.LayerNorm)
    assert isinstance(skip, nn.LayerNorm)
    assert [name for name, _ in skip.named_parameters()] == ["weight", "bias"]


@pytest.mark.parametrize(
    "options, words",
    [
        (dict(skip_variant="rskip"), ["skip_variant", "'rskip'", "rskip_ln", "post_ln"]),
        (dict(skip_recursions=0), ["skip_recursions", "0", ">= 1"]),
        (dict(skip_recursions=1.5), ["skip_recursions", "1.5", "integer"]),
        (dict(skip_recursions=True), ["skip_recursions", "True", "integer"]),
        (dict(skip_variant="xskip", skip_scale=0.0), ["skip_scale", "0.0", "> 0"]),
        (dict(skip_variant="xskip_ln", skip_scale=-1.0), ["skip_scale", "-1.0", "> 0"]),
        (dict(skip_variant="xskip_bn", skip_scale=float("nan")), ["skip_scale", "nan", "finite"]),
        (dict(skip_variant="post_ln", skip_recursions=3), ["skip_recursions", "3", "post_ln", "rskip_ln"]),
        (dict(skip_variant="rskip_ln", skip_scale=0.5), ["skip_scale", "0.5", "rskip_ln", "xskip"]),
        (dict(skip_variant="xskip", skip_share_norm=True), ["skip_share_norm", "True", "xskip", "rskip_ln"]),
        (dict(skip_variant="post_ln", skip_learnable_scale=True), ["skip_learnable_scale", "post_ln", "xskip"]),
        (dict(skip_share_norm="yes"), ["skip_share_norm", "'yes'", "True or False"]),
    ],
)
def test_bad_options_name_field_value_and_allowed(options, words):
    with pytest.raises(ValueError) as error:
        SkipOptions(**options)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("variant", SKIP_VARIANTS)
def test_every_variant_builds_with_defaults(variant, xh):
    x, h = xh
    skip = create_skip(SkipOptions(skip_variant=variant), D).train()
    assert skip(skip.branch_input(x), h).shape == x.shape
