"""rskip's timm ResNets: each skip variant's equation on single blocks, the CIFAR PreAct-ResNets, stock-timm
equivalence of `plain`, `patch_timm_resnet`, and timm's serialisation (`model_args`, `save_for_hf`, `local-dir:`,
`push_to_hf_hub`)."""

import json
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d, DropPath, GroupNorm1, LayerNorm2d, create_conv2d
from timm.models.resnetv2 import DownsampleConv
from torch import nn

from rskip import (
    ConfigFieldError,
    ResNetSkipOptions,
    RSkipBasicBlock,
    RSkipBottleneck,
    RSkipPreActBasic,
    RSkipPreActBottleneck,
    patch_timm_resnet,
)
from rskip.residual import NormSkip, ResidualSkip, ScaledSkip
from rskip.timm_resnets import STAGES

LEARNED_SCALE = 0.7  # what `randomize` sets a learnable λ to


def ln_chw(z, norm):
    """LN of each sample over (C, H, W), with a per-channel affine."""
    mean = z.mean(dim=(1, 2, 3), keepdim=True)
    var = z.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + norm.eps) * norm.weight[:, None, None] + norm.bias[:, None, None]


def ln_c(z, norm):
    """LN of each position over C."""
    mean = z.mean(dim=1, keepdim=True)
    var = z.var(dim=1, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + norm.eps) * norm.weight[:, None, None] + norm.bias[:, None, None]


def bn_eval(z, norm):
    """BatchNorm with running statistics (eval mode)."""
    shape = (1, -1, 1, 1)
    scaled = (z - norm.running_mean.view(shape)) / torch.sqrt(norm.running_var.view(shape) + norm.eps)
    return scaled * norm.weight.view(shape) + norm.bias.view(shape)


# variant name -> (skip options, y = f(s, h, skip) with s the shortcut, h the branch output)
EQUATIONS = {
    "plain": (dict(skip_variant="plain"), lambda s, h, n: s + h),
    "post_ln": (dict(skip_variant="post_ln"), lambda s, h, n: ln_chw(s + h, n)),
    "xskip": (dict(skip_variant="xskip", skip_scale=0.5), lambda s, h, n: 0.5 * s + h),
    "xskip_learnable": (dict(skip_variant="xskip", skip_scale=0.5, skip_learnable_scale=True),
                        lambda s, h, n: LEARNED_SCALE * s + h),
    "xskip_ln": (dict(skip_variant="xskip_ln", skip_scale=2.0), lambda s, h, n: ln_chw(2.0 * s + h, n)),
    "rskip_ln": (dict(skip_variant="rskip_ln", skip_recursions=3),
                 lambda s, h, n: ln_chw(s + ln_chw(s + ln_chw(s + h, n), n.recursion_norms[0]), n.recursion_norms[1])),
    "rskip_ln_shared": (dict(skip_variant="rskip_ln", skip_share_norm=True),
                        lambda s, h, n: ln_chw(s + ln_chw(s + h, n), n)),
    "rskip_ln_c": (dict(skip_variant="rskip_ln", skip_norm_dims="c"),
                   lambda s, h, n: ln_c(s + ln_c(s + h, n), n.recursion_norms[0])),
    "xskip_bn": (dict(skip_variant="xskip_bn", skip_scale=1.5), lambda s, h, n: bn_eval(1.5 * s + h, n)),
    "rskip_bn": (dict(skip_variant="rskip_bn"), lambda s, h, n: bn_eval(s + bn_eval(s + h, n), n.recursion_norms[0])),
}


def randomize(module: nn.Module) -> nn.Module:
    """Random affine parameters, running statistics and learned scales, so that every term of an equation shows."""
    torch.manual_seed(1)
    for sub in module.modules():
        if isinstance(sub, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            nn.init.normal_(sub.weight, 1.0, 0.3)
            nn.init.normal_(sub.bias, 0.0, 0.3)
        if isinstance(sub, nn.BatchNorm2d):
            sub.running_mean.normal_(0.0, 0.5)
            sub.running_var.uniform_(0.5, 2.0)
        if isinstance(getattr(sub, "scale", None), nn.Parameter):
            sub.scale.data.fill_(LEARNED_SCALE)
    return module.eval()


def projection(in_chs, out_chs):
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=2, bias=False), nn.BatchNorm2d(out_chs))


PREACT_ARGS = dict(stride=2, conv_layer=create_conv2d, proj_layer=DownsampleConv,
                   norm_layer=partial(BatchNormAct2d, act_layer=nn.ReLU))


# block kind -> (build(skip_options), shortcut and branch of the block computed from its parts, final activation)
BLOCKS = {
    "basic": (
        lambda options: RSkipBasicBlock(8, 16, stride=2, downsample=projection(8, 16), skip_options=options),
        lambda b, x: (b.downsample(x), b.bn2(b.conv2(b.act1(b.bn1(b.conv1(x)))))),
        torch.relu,
    ),
    "bottleneck": (
        lambda options: RSkipBottleneck(8, 4, stride=2, downsample=projection(8, 16), skip_options=options),
        lambda b, x: (b.downsample(x), b.bn3(b.conv3(b.act2(b.bn2(b.conv2(b.act1(b.bn1(b.conv1(x))))))))),
        torch.relu,
    ),
    "preact_basic": (
        lambda options: RSkipPreActBasic(8, 16, bottle_ratio=1.0, skip_options=options, **PREACT_ARGS),
        lambda b, x: (b.downsample(b.norm1(x)), b.conv2(b.norm2(b.conv1(b.norm1(x))))),
        lambda y: y,
    ),
    "preact_bottleneck": (
        lambda options: RSkipPreActBottleneck(8, 16, skip_options=options, **PREACT_ARGS),
        lambda b, x: (b.downsample(b.norm1(x)), b.conv3(b.norm3(b.conv2(b.norm2(b.conv1(b.norm1(x))))))),
        lambda y: y,
    ),
}


@pytest.mark.parametrize("block_kind", BLOCKS)
@pytest.mark.parametrize("variant", EQUATIONS)
@torch.no_grad()
def test_block_output_is_the_variant_equation(block_kind, variant):
    options, equation = EQUATIONS[variant]
    build, shortcut_and_branch, final_act = BLOCKS[block_kind]
    block = randomize(build(ResNetSkipOptions(**options)))
    x = torch.randn(2, 8, 8, 8)
    s, h = shortcut_and_branch(block, x)
    torch.testing.assert_close(block(x), final_act(equation(s, h, block.skip)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_kind", BLOCKS)
@torch.no_grad()
def test_pre_ln_block_feeds_the_branch_ln_of_its_input(block_kind):
    build, shortcut_and_branch, final_act = BLOCKS[block_kind]
    block = randomize(build(ResNetSkipOptions(skip_variant="pre_ln")))
    x = torch.randn(2, 8, 8, 8)
    s, h = shortcut_and_branch(block, ln_chw(x, block.skip))
    if not block_kind.startswith("preact"):
        s = block.downsample(x)  # post-activation blocks project x itself
    torch.testing.assert_close(block(x), final_act(s + h), rtol=1e-5, atol=1e-5)


def test_skip_norms_are_group_norm_layer_norm_2d_or_batch_norm():
    def norm_of(**options):
        return RSkipBasicBlock(8, 8, skip_options=ResNetSkipOptions(**options)).skip

    assert isinstance(norm_of(), GroupNorm1) and norm_of().num_groups == 1
    assert isinstance(norm_of(skip_norm_dims="c"), LayerNorm2d)
    assert isinstance(norm_of(skip_variant="rskip_bn"), nn.BatchNorm2d)
    assert type(norm_of(skip_variant="plain")) is ResidualSkip
    assert type(norm_of(skip_variant="xskip", skip_scale=2.0)) is ScaledSkip
    learned = norm_of(skip_variant="xskip_ln", skip_scale=2.0, skip_learnable_scale=True).scale
    assert isinstance(learned, nn.Parameter) and learned.item() == 2.0


def test_entrypoints_default_to_rskip_ln_with_two_recursions():
    for name in ("preact_resnet20", "rskip_resnet18"):
        model = timm.create_model(name)
        skips = [module.skip for module in model.modules() if hasattr(module, "skip")]
        assert skips and all(isinstance(skip, NormSkip) and isinstance(skip, GroupNorm1) for skip in skips)
        assert all(skip.recursions == 2 and len(skip.recursion_norms) == 1 for skip in skips)


def test_entrypoints_are_registered_and_take_timm_model_arguments():
    assert set(timm.list_models("preact_resnet*")) == {f"preact_resnet{d}" for d in (20, 56, 110, 164)}
    assert set(timm.list_models("rskip_resnet*")) == {f"rskip_resnet{d}" for d in (18, 34, 50, 101, 152)}
    model = timm.create_model("preact_resnet20", in_chans=1, num_classes=4, drop_rate=0.2, drop_path_rate=0.1,
                              global_pool="max").eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    assert isinstance(model.stages[2].blocks[-1].drop_path, DropPath) and model.head.drop.p == 0.2
    assert model.head.global_pool.pool_type == "max"


@pytest.mark.parametrize("name, blocks, widths, parameters", [
    ("preact_resnet110", 18, (16, 32, 64), 1.73e6),
    ("preact_resnet164", 18, (64, 128, 256), 1.70e6),
])
@torch.no_grad()
def test_cifar_preact_resnets_follow_he_et_al(name, blocks, widths, parameters):
    model = timm.create_model(name, skip_variant="plain").eval()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameters, rel=0.01)
    stem = model.stem.conv
    assert list(model.stem) == [stem] and stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert [len(stage.blocks) for stage in model.stages] == [blocks] * 3
    expansion = 4 if name.endswith("164") else 1
    assert [stage.blocks[-1].conv1.out_channels * expansion for stage in model.stages] == list(widths)
    assert isinstance(model.norm, BatchNormAct2d) and isinstance(model.norm.act, nn.ReLU)
    features = model.forward_features(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, widths[-1], 8, 8) and features.min() >= 0  # final BN -> ReLU
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@torch.no_grad()
def test_cifar_forward_intermediates_and_pruning_count_four_feature_levels():
    model = timm.create_model("preact_resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    final, intermediates = model.forward_intermediates(x)
    assert [tuple(t.shape[1:]) for t in intermediates] == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]
    torch.testing.assert_close(final, model.forward_features(x))
    last = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert len(last) == 1 and torch.equal(last[0], intermediates[-1])
    take = model.prune_intermediate_layers(indices=[2])
    assert len(model.stages) == 2 and torch.equal(model.forward_intermediates(x, take, intermediates_only=True)[0],
                                                  intermediates[2])


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@torch.no_grad()
def test_rskip_resnet_plain_is_timm_resnet(name):
    torch.manual_seed(0)
    stock = timm.create_model(name).eval()
    torch.manual_seed(0)
    ours = timm.create_model(f"rskip_{name}", skip_variant="plain").eval()
    assert ours.state_dict().keys() == stock.state_dict().keys()
    assert all(torch.equal(value, stock.state_dict()[key]) for key, value in ours.state_dict().items())
    ours.load_state_dict(stock.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(ours(x), stock(x))


@torch.no_grad()
def test_patch_plain_leaves_any_timm_resnet_unchanged():
    stock = timm.create_model("resnet18d").eval()  # deep stem, average-pool downsampling
    x = torch.randn(1, 3, 64, 64)
    expected = stock(x)
    patched = patch_timm_resnet(stock, skip_variant="plain")
    assert isinstance(patched.layer1[0], RSkipBasicBlock)
    assert torch.equal(patched(x), expected)


@torch.no_grad()
def test_patch_keeps_weights_and_matches_the_rskip_entrypoint():
    stock = timm.create_model("resnet50").eval()
    weights = {key: value.clone() for key, value in stock.state_dict().items()}
    patched = patch_timm_resnet(stock, skip_variant="rskip_ln", skip_recursions=2)
    state = patched.state_dict()
    assert all(torch.equal(state[key], value) for key, value in weights.items())
    new = {key: value for key, value in state.items() if key not in weights}
    assert new and all(".skip." in key for key in new)
    assert all(torch.all(value == (1.0 if key.endswith("weight") else 0.0)) for key, value in new.items())

    built = timm.create_model("rskip_resnet50", skip_variant="rskip_ln", skip_recursions=2).eval()
    built.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(built(x), patched(x))
    assert patched.pretrained_cfg["architecture"] == "rskip_resnet50"
    assert timm.models.get_model_args(patched)["skip_variant"] == "rskip_ln"


def test_patch_rejects_other_models_and_patched_models():
    with pytest.raises(ValueError, match="must be a timm ResNet.*ResNetV2"):
        patch_timm_resnet(timm.create_model("resnetv2_18"))
    with pytest.raises(ValueError, match="RSkipBasicBlock"):
        patch_timm_resnet(timm.create_model("rskip_resnet18"))
    with pytest.raises(ValueError, match="skip_variant='rskip'"):
        patch_timm_resnet(timm.create_model("resnet18"), skip_variant="rskip")


# Stock timm families (timm.models.resnet: BasicBlock or Bottleneck), shrunk to one block per stage where they are big.
PATCHED_FAMILIES = {
    "resnet18": {},  # recorded as its rskip_resnet18 counterpart
    "resnet10t": {},  # tiered deep stem
    "resnet26d": dict(layers=(1, 1, 1, 1)),  # deep stem, average-pool downsampling
    "seresnet18": {},  # squeeze-excitation
    "ecaresnet26t": dict(layers=(1, 1, 1, 1)),  # efficient channel attention
    "resnext50_32x4d": dict(layers=(1, 1, 1, 1)),  # grouped convolutions
    "wide_resnet50_2": dict(layers=(1, 1, 1, 1)),  # wider bottleneck
    "resnetblur18": {},  # anti-aliased (blur-pool) downsampling
}


@pytest.mark.parametrize("name", PATCHED_FAMILIES)
@torch.no_grad()
def test_patched_stock_families_save_and_load_back_with_their_skip_connection(name, tmp_path):
    stock = timm.create_model(name, num_classes=5, **PATCHED_FAMILIES[name])
    stock_blocks = [type(block) for stage in STAGES for block in getattr(stock, stage)]
    model = randomize(patch_timm_resnet(stock, skip_variant="rskip_ln", skip_recursions=3, skip_norm_dims="c"))
    assert [type(block) for block in model.modules() if hasattr(block, "skip")] == [
        {timm.models.resnet.BasicBlock: RSkipBasicBlock, timm.models.resnet.Bottleneck: RSkipBottleneck}[kind]
        for kind in stock_blocks]
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    if name == "resnet18":
        assert config["architecture"] == "rskip_resnet18" and "timm_architecture" not in config["model_args"]
    else:
        assert (config["architecture"], config["model_args"]["timm_architecture"]) == ("rskip_timm_resnet", name)

    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]
    assert loaded.layer1[0].skip.recursions == 3 and isinstance(loaded.layer1[0].skip, LayerNorm2d)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("name, block", [
    ("skresnet18", "SelectiveKernelBasic"),
    ("skresnext50_32x4d", "SelectiveKernelBottleneck"),
    ("resnest14d", "ResNestBottleneck"),
    ("res2net50_14w_8s", "Bottle2neck"),
])
def test_patch_refuses_resnets_of_other_blocks_and_leaves_them_unchanged(name, block):
    with torch.device("meta"):  # only the module tree matters
        model = timm.create_model(name, layers=(1, 1, 1, 1))
    modules, pretrained_cfg = [type(m) for m in model.modules()], dict(model.pretrained_cfg)
    with pytest.raises(ValueError, match=rf"blocks of type {block}, which patch_timm_resnet cannot convert; allowed: "
                                         r"timm's BasicBlock and Bottleneck"):
        patch_timm_resnet(model, skip_variant="rskip_ln")
    assert [type(m) for m in model.modules()] == modules and not hasattr(model.layer1[0], "skip")
    assert model.pretrained_cfg == pretrained_cfg and "skip_variant" not in timm.models.get_model_args(model)


def test_rskip_timm_resnet_needs_a_timm_architecture():
    model = timm.create_model("rskip_timm_resnet", timm_architecture="seresnet18", skip_variant="post_ln")
    assert isinstance(model.layer1[0], RSkipBasicBlock) and model.layer1[0].se is not None
    for bad in (None, "seresnet_18"):
        with pytest.raises(ValueError, match=rf"timm_architecture={bad!r} is not a timm model; allowed: a model of"):
            timm.create_model("rskip_timm_resnet", timm_architecture=bad)
    with pytest.raises(ValueError, match="blocks of type SelectiveKernelBasic"):
        timm.create_model("rskip_timm_resnet", timm_architecture="skresnet18")


def test_skip_arguments_are_recorded_as_json_model_args():
    model = timm.create_model("preact_resnet20", skip_variant="xskip_ln", skip_scale=0.5)
    model_args = timm.models.get_model_args(model)
    assert json.loads(json.dumps(model_args)) == model_args
    assert {key: model_args[key] for key in ResNetSkipOptions.__dataclass_fields__} == dict(
        skip_variant="xskip_ln", skip_scale=0.5, skip_recursions=2, skip_share_norm=False,
        skip_learnable_scale=False, skip_norm_dims="chw",
    )


@pytest.mark.parametrize("build", [
    lambda: timm.create_model("preact_resnet20", skip_variant="rskip_bn", skip_recursions=3, num_classes=7),
    lambda: timm.create_model("rskip_resnet18", skip_variant="xskip", skip_scale=0.5, skip_learnable_scale=True),
    lambda: patch_timm_resnet(timm.create_model("resnet18"), skip_norm_dims="c"),
], ids=["preact_resnet20-rskip_bn-K3", "rskip_resnet18-xskip-learnable", "patched-resnet18-ln-c"])
@torch.no_grad()
def test_save_for_hf_folder_loads_back_with_its_skip_connection(build, tmp_path):
    model = randomize(build())
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert type(loaded) is type(model)
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


def test_push_to_hf_hub_uploads_a_loadable_folder(tmp_path, monkeypatch):
    uploads = tmp_path / "uploaded"

    class FakeHfApi:
        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, **kwargs):
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def file_exists(self, **kwargs):
            return False

        def upload_folder(self, folder_path, **kwargs):
            for path in Path(folder_path).iterdir():
                (uploads / path.name).parent.mkdir(parents=True, exist_ok=True)
                (uploads / path.name).write_bytes(path.read_bytes())

    monkeypatch.setattr(timm.models._hub, "HfApi", FakeHfApi)
    model = timm.create_model("preact_resnet20", skip_variant="rskip_ln", skip_recursions=3).eval()
    timm.models.push_to_hf_hub(model, "someone/preact-resnet20-rskip", model_card=dict(description="test"))

    config = json.loads((uploads / "config.json").read_text())
    assert config["architecture"] == "preact_resnet20" and config["model_args"]["skip_recursions"] == 3
    assert {"model.safetensors", "README.md"} <= {path.name for path in uploads.iterdir()}
    loaded = timm.create_model(f"local-dir:{uploads}", pretrained=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("kwargs, message", [
    (dict(skip_variant="rskip"), r"skip_variant='rskip' is not known; allowed: plain, post_ln"),
    (dict(skip_recursions=0), r"skip_recursions=0 is not a valid recursion depth K; allowed: an integer >= 1"),
    (dict(skip_norm_dims="hw"), r"skip_norm_dims='hw' is not known; allowed: chw, c"),
    (dict(skip_variant="rskip_bn", skip_norm_dims="c"),
     r"skip_norm_dims='c' is set but skip_variant='rskip_bn' does not use it; allowed: its default, 'chw', unless "
     r"skip_variant is one of post_ln, pre_ln, xskip_ln, rskip_ln"),
    (dict(skip_variant="plain", skip_scale=2.0), r"skip_scale=2.0 is set but skip_variant='plain' does not use it"),
])
def test_bad_skip_arguments_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        timm.create_model("preact_resnet20", **kwargs)
    assert isinstance(error.value, ConfigFieldError)
    bad_field = next(name for name in kwargs if name != "skip_variant" or len(kwargs) == 1)
    assert (error.value.field, error.value.value) == (bad_field, kwargs[bad_field])


def test_unknown_model_arguments_raise_type_errors():
    with pytest.raises(TypeError, match="skip_varient"):
        timm.create_model("preact_resnet20", skip_varient="plain")
