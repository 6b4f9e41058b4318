"""rskip.diagnostics: per-sublayer gradient norms and the output change, against values computed by hand."""

import math

import pytest
import timm
import torch
from torch import nn

from rskip import CifarPreActResNet, ResNetSkipOptions, RSkipMarianConfig, RSkipMarianMTModel, SkipOptions, create_skip
from rskip.diagnostics import layer_of, measure, plot_by_depth, plot_layers, random_batch


class BiasBranch(nn.Module):
    """A residual block y = skip(x, F(x)) whose branch is a bias only, F(x) = b (b = 0 at the start)."""

    def __init__(self, width: int, options: SkipOptions):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(width, dtype=torch.float64))
        self.skip = create_skip(options, width)

    def forward(self, x):
        return self.skip(x, self.bias.expand_as(x))


class Stack(nn.Module):
    def __init__(self, depth: int, width: int, options: SkipOptions):
        super().__init__()
        self.layers = nn.ModuleList(BiasBranch(width, options) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def linear_loss(model, batch):
    """L = <c, y>: the gradient reaching the output is c, whatever the weights."""
    outputs = model(batch["x"])
    return (outputs * batch["c"]).sum(), outputs


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_xskip_gradient_ratio_follows_lambda_to_the_depth(scale):
    # y_L = λ^L·x + Σ_i λ^(L-1-i)·b_i, so dL/db_i = λ^(L-1-i)·Σ_batch c exactly.
    depth, width = 7, 5
    model = Stack(depth, width, SkipOptions(skip_variant="xskip", skip_scale=scale))
    batch = {"x": torch.randn(3, width, dtype=torch.float64), "c": torch.randn(3, width, dtype=torch.float64)}
    report = measure(model, batch, loss_fn=linear_loss)
    upstream = batch["c"].sum(0).norm().item()
    norms = [record["grad_norm"] for record in report["layers"]]
    assert [record["index"] for record in report["layers"]] == list(range(depth))
    assert norms == pytest.approx([scale ** (depth - 1 - i) * upstream for i in range(depth)], rel=1e-12)
    assert report["gradient_ratio"] == pytest.approx(scale ** (depth - 1), rel=1e-12)


def test_a_norm_after_the_add_keeps_the_ratio_near_one_where_xskip_does_not():
    torch.manual_seed(0)
    ratios = {}
    for label, options in {"xskip": SkipOptions(skip_variant="xskip", skip_scale=0.5),
                           "xskip_ln": SkipOptions(skip_variant="xskip_ln", skip_scale=0.5)}.items():
        model = RSkipMarianMTModel(tiny_marian(options, layers=4))
        ratios[label] = measure(model, random_batch(model, 2, 5))["gradient_ratio"]
    # 8 encoder sublayers: about 0.5^7 without a norm.
    assert ratios["xskip"] < 0.05 < 0.3 < ratios["xskip_ln"] < 3


def tiny_marian(options: SkipOptions, layers: int = 2) -> RSkipMarianConfig:
    return RSkipMarianConfig(vocab_size=99, d_model=16, encoder_layers=layers, decoder_layers=layers,
                             encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                             decoder_ffn_dim=32, pad_token_id=98, decoder_start_token_id=98, dropout=0.3,
                             max_position_embeddings=16,
                             **options.to_dict())


def test_marian_sublayers_are_measured_in_order_and_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = RSkipMarianMTModel(tiny_marian(SkipOptions(skip_variant="rskip_ln", skip_recursions=2)))
    model.train()
    batch = random_batch(model, 2, 5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = measure(model, batch)
    assert [(r["stack"], r["index"], r["sublayer"]) for r in report["layers"]] == [
        ("encoder", 0, "self_attn"), ("encoder", 0, "ffn"), ("encoder", 1, "self_attn"), ("encoder", 1, "ffn"),
        ("decoder", 0, "self_attn"), ("decoder", 0, "cross_attn"), ("decoder", 0, "ffn"),
        ("decoder", 1, "self_attn"), ("decoder", 1, "cross_attn"), ("decoder", 1, "ffn")]
    assert all(r["grad_norm"] > 0 for r in report["layers"])
    assert set(report["stacks"]) == {"encoder", "decoder"}
    assert 0 < report["output_change"] and 0 < report["relative_output_change"] < 1
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_the_output_change_of_one_adam_step_is_computed_as_defined():
    # One linear layer f(x) = Wx, L = <c, f(x)>: g = c xᵀ, Adam's first step moves every weight by η·sign(g).
    model = nn.Sequential()
    model.layers = nn.ModuleList([nn.Linear(3, 2, bias=False).double()])
    model.forward = lambda x: model.layers[0](x)
    x, c = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    report = measure(model, {"x": x, "c": c}, loss_fn=linear_loss, step_size=1e-2)
    delta = -1e-2 * torch.sign(c.T @ x)
    assert report["output_change"] == pytest.approx((x @ delta.T).pow(2).mean().sqrt().item(), rel=1e-6)
    noisy = measure(model, {"x": x, "c": c}, loss_fn=linear_loss, perturbation="random", step_size=1e-2)
    assert 0 < noisy["output_change"] < report["output_change"] * 10
    with pytest.raises(ValueError, match="perturbation"):
        measure(model, {"x": x, "c": c}, loss_fn=linear_loss, perturbation="sgd")


def test_resnets_are_measured_per_block_and_batchnorm_statistics_are_kept():
    torch.manual_seed(0)
    model = CifarPreActResNet(layers=(1, 1, 1), skip_options=ResNetSkipOptions(skip_variant="rskip_bn"))
    stats = {name: b.clone() for name, b in model.named_buffers()}
    report = measure(model, random_batch(model, 4, image_size=16))
    assert [(r["stack"], r["position"]) for r in report["layers"]] == [("blocks", 0), ("blocks", 1), ("blocks", 2)]
    assert all(torch.equal(b, stats[name]) for name, b in model.named_buffers())
    stock = timm.create_model("resnet18", num_classes=10)  # a stock timm ResNet: blocks layer1.0 ... layer4.1
    report = measure(stock, random_batch(stock, 2, image_size=32))
    assert len(report["layers"]) == 8 and math.isfinite(report["gradient_ratio"])
    assert layer_of("model.encoder.layers.3.fc1.weight") == ("encoder", 3, "ffn")
    assert layer_of("model.shared.weight") is None


def test_plots_are_written(tmp_path):
    model = Stack(3, 2, SkipOptions(skip_variant="xskip", skip_scale=2.0))
    batch = {"x": torch.randn(2, 2, dtype=torch.float64), "c": torch.randn(2, 2, dtype=torch.float64)}
    report = measure(model, batch, loss_fn=linear_loss)
    assert plot_layers({"xskip": report}, tmp_path / "layers.png").stat().st_size > 0
    assert plot_by_depth({"xskip": {3: 4.0, 6: 32.0}}, tmp_path / "depth.png", "ratio").stat().st_size > 0
