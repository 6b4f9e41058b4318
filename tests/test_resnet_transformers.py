"""RSkipResNetConfig / RSkipResNetModel / RSkipResNetForImageClassification: configuration, initialisation,
save/load (Auto classes, remote code without rskip, pipeline), Trainer, and loading timm checkpoints."""

import io
import json
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    pipeline,
)
from transformers.dynamic_module_utils import get_class_from_dynamic_module

import rskip
from rskip import (
    RSkipResNetConfig,
    RSkipResNetForImageClassification,
    RSkipResNetModel,
    patch_timm_resnet,
)

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "train.parquet"
TINY = dict(backbone="preact_resnet20", num_labels=10)


def randomize(model: nn.Module) -> nn.Module:
    """Random norm parameters and statistics, so that loaded and fresh weights differ everywhere."""
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            nn.init.normal_(module.weight, 1.0, 0.3)
            nn.init.normal_(module.bias, 0.0, 0.3)
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def skip_keys(state_dict) -> set[str]:
    return {key for key in state_dict if ".skip." in key}


@pytest.fixture(scope="module")
def cifar_images() -> list[Image.Image]:
    if not CIFAR10.exists():
        raise FileNotFoundError(f"{CIFAR10} must hold CIFAR-10 (see ../shared/data/README.md)")
    rows = pq.read_table(CIFAR10, columns=["img"]).slice(0, 4).column("img").to_pylist()
    return [Image.open(io.BytesIO(row["bytes"])).convert("RGB") for row in rows]


@pytest.fixture(scope="module")
def saved_classifier(tmp_path_factory):
    """A randomised rSkip+LN (K = 2) PreAct-ResNet-20 saved with `save_pretrained`, with an input and its logits."""
    directory = tmp_path_factory.mktemp("rskip-resnet")
    model = randomize(RSkipResNetForImageClassification(RSkipResNetConfig(**TINY)))
    model.save_pretrained(directory)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(pixel_values).logits
    torch.save({"pixel_values": pixel_values, "logits": logits}, directory / "expected.pt")
    return directory, model, pixel_values, logits


def test_config_defaults():
    config = RSkipResNetConfig()
    assert config.model_type == "rskip_resnet"
    assert (config.backbone, config.skip_variant, config.skip_recursions, config.skip_scale) == (
        "preact_resnet110", "rskip_ln", 2, 1.0)
    assert (config.skip_share_norm, config.skip_learnable_scale, config.skip_norm_dims, config.in_chans) == (
        False, False, "chw", 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(backbone="resnet50"),
     r"backbone='resnet50' is not an rskip timm model; allowed: preact_resnet20, .*rskip_resnet50"),
    (dict(skip_variant="rskip"), r"skip_variant='rskip' is not known; allowed: plain"),
    (dict(skip_recursions=0), r"skip_recursions=0 is not a valid recursion depth K; allowed: an integer >= 1"),
    (dict(skip_norm_dims="hw"), r"skip_norm_dims='hw' is not known"),
    (dict(skip_variant="post_ln", skip_recursions=3), r"skip_recursions=3 is set but skip_variant='post_ln'"),
    (dict(in_chans=0), r"in_chans=0 is not a channel count; allowed: an integer >= 1"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(rskip.ConfigFieldError, match=message) as error:
        RSkipResNetConfig(**kwargs)
    bad_field = next(name for name in kwargs if name != "skip_variant" or len(kwargs) == 1)
    assert (error.value.field, error.value.value) == (bad_field, kwargs[bad_field])
    assert error.value.allowed in str(error.value)


def test_classifier_returns_the_loss_only_with_labels():
    model = RSkipResNetForImageClassification(RSkipResNetConfig(**TINY)).eval()
    pixel_values, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 9])
    output = model(pixel_values, labels=labels)
    torch.testing.assert_close(output.loss, nn.functional.cross_entropy(output.logits, labels))
    assert model(pixel_values).loss is None and output.logits.shape == (3, 10)


def test_wrong_channel_count_raises_a_value_error():
    model = RSkipResNetForImageClassification(RSkipResNetConfig(**TINY))
    with pytest.raises(ValueError, match=r"pixel_values has shape \(1, 1, 32, 32\); expected \(batch, 3, .*in_chans=3"):
        model(torch.randn(1, 1, 32, 32))


def test_fresh_model_keeps_timm_initialisation():
    model = RSkipResNetForImageClassification(RSkipResNetConfig(backbone="rskip_resnet18", num_labels=10))
    block = model.timm_model.layer2[0]
    fan_out = block.conv1.out_channels * 9
    assert block.conv1.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)  # kaiming, not N(0, 0.02)
    assert torch.all(block.bn2.weight == 0)  # timm's zero-init of the branch's last BN
    assert torch.all(block.skip.weight == 1) and torch.all(block.skip.bias == 0)
    assert model.timm_model.fc.weight.abs().max() <= 512 ** -0.5  # torch's default Linear init


@pytest.mark.parametrize("backbone", ["preact_resnet20", "rskip_resnet18"])
def test_from_pretrained_initialises_the_missing_skip_norms_only(backbone, tmp_path):
    config = RSkipResNetConfig(backbone=backbone, num_labels=10, skip_variant="plain")
    plain = randomize(RSkipResNetForImageClassification(config))
    plain.save_pretrained(tmp_path)
    model = RSkipResNetForImageClassification.from_pretrained(tmp_path, skip_variant="rskip_ln")
    state = model.state_dict()
    assert skip_keys(state) and all(
        torch.all(state[key] == (1.0 if key.endswith("weight") else 0.0)) for key in skip_keys(state))
    assert all(torch.equal(state[key], value) for key, value in plain.state_dict().items())


def test_mismatched_num_labels_raise_unless_ignored(saved_classifier):
    directory, saved, _, _ = saved_classifier
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        RSkipResNetForImageClassification.from_pretrained(directory, num_labels=5)
    model = RSkipResNetForImageClassification.from_pretrained(directory, num_labels=5, ignore_mismatched_sizes=True)
    head = model.timm_model.head.fc
    assert head.weight.shape == (5, 64, 1, 1) and torch.all(head.bias == 0)
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.3)  # ResNetV2's head init, N(0, 0.01)
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in saved.state_dict().items() if ".head.fc." not in key)


def test_saved_folder_has_auto_map_code_and_image_processor(saved_classifier):
    directory, _, pixel_values, logits = saved_classifier
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_rskip_resnet.RSkipResNetConfig",
        "AutoModelForImageClassification": "modeling_rskip_resnet.RSkipResNetForImageClassification",
    }
    assert {"modeling_rskip_resnet.py", "configuration_rskip_resnet.py", "timm_resnets.py", "residual.py",
            "skip_options.py", "preprocessor_config.json"} <= {path.name for path in directory.iterdir()}
    assert isinstance(AutoConfig.from_pretrained(directory), RSkipResNetConfig)
    model = AutoModelForImageClassification.from_pretrained(directory, trust_remote_code=True).eval()
    assert isinstance(model, RSkipResNetForImageClassification)
    with torch.no_grad():
        assert torch.equal(model(pixel_values).logits, logits)


def test_headless_model_returns_the_pooled_features(saved_classifier):
    directory, classifier, pixel_values, _ = saved_classifier
    model = AutoModel.from_pretrained(directory).eval()
    assert isinstance(model, RSkipResNetModel)
    with torch.no_grad():
        output = model(pixel_values)
        features = classifier.timm_model.forward_features(pixel_values)
        torch.testing.assert_close(output.last_hidden_state, features, rtol=0, atol=0)
        torch.testing.assert_close(output.pooler_output, features.mean(dim=(2, 3)))


@torch.no_grad()
def test_hidden_states_are_the_stem_and_stage_outputs(saved_classifier):
    _, model, pixel_values, logits = saved_classifier
    output = model(pixel_values, output_hidden_states=True)
    assert [tuple(h.shape[1:]) for h in output.hidden_states] == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]
    torch.testing.assert_close(output.logits, logits)


def test_image_processor_is_timm_eval_preprocessing(saved_classifier, cifar_images):
    _, model, _, _ = saved_classifier
    processor = model.create_image_processor()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model.timm_model))
    expected = torch.stack([transform(image) for image in cifar_images])
    torch.testing.assert_close(processor(cifar_images, return_tensors="pt")["pixel_values"], expected)


def test_pipeline_classifies_images_from_the_saved_folder(saved_classifier, cifar_images):
    directory, model, _, _ = saved_classifier
    classifier = pipeline("image-classification", model=str(directory), trust_remote_code=True, top_k=1)
    predictions = classifier(cifar_images)
    pixel_values = model.create_image_processor()(cifar_images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probabilities = model(pixel_values).logits.softmax(-1)
    for prediction, row in zip(predictions, probabilities):
        assert prediction[0]["label"] == model.config.id2label[row.argmax().item()]
        assert prediction[0]["score"] == pytest.approx(row.max().item(), abs=1e-5)


def test_saved_folder_works_where_rskip_cannot_be_imported(saved_classifier, run_python):
    directory, _, _, _ = saved_classifier
    result = run_python(
        """
import sys
sys.modules["rskip"] = None  # `import rskip` fails from here on
import warnings
import torch
from transformers import AutoModelForImageClassification, pipeline
from PIL import Image

directory = sys.argv[1]
expected = torch.load(f"{directory}/expected.pt")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = AutoModelForImageClassification.from_pretrained(directory, trust_remote_code=True).eval()
    classifier = pipeline("image-classification", model=directory, trust_remote_code=True)
with torch.no_grad():
    assert torch.equal(model(expected["pixel_values"]).logits, expected["logits"])
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
assert len(classifier(Image.new("RGB", (32, 32)))) == 5
assert not [w for w in caught if "Overwriting" in str(w.message)], [str(w.message) for w in caught]
print("ok")
""",
        directory,
    )
    assert result.stdout.strip().endswith("ok")


def test_remote_code_copy_leaves_timm_registry_to_rskip(saved_classifier):
    directory, _, _, _ = saved_classifier
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        remote_class = get_class_from_dynamic_module(
            "modeling_rskip_resnet.RSkipResNetForImageClassification", str(directory))
    assert remote_class.__module__.startswith("transformers_modules.")
    assert not [w for w in caught if "Overwriting" in str(w.message)]
    assert timm.models.model_entrypoint("preact_resnet20") is rskip.timm_resnets.preact_resnet20


def test_trainer_trains_with_gradient_accumulation(tmp_path):
    torch.manual_seed(0)
    model = RSkipResNetForImageClassification(RSkipResNetConfig(**TINY))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    dataset = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 10} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=0.1, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    assert trainer.model_accepts_loss_kwargs is False  # Trainer divides the loss by the accumulation steps
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.state_dict()["timm_model.stem.conv.weight"], before["timm_model.stem.conv.weight"])


def test_gradient_checkpointing_keeps_outputs(saved_classifier):
    _, model, pixel_values, logits = saved_classifier
    model.activation_checkpointing_enable()
    try:
        assert all(stage.grad_checkpointing for stage in model.timm_model.stages)
        with torch.no_grad():
            torch.testing.assert_close(model(pixel_values).logits, logits)
    finally:
        model.activation_checkpointing_disable()
    assert not any(stage.grad_checkpointing for stage in model.timm_model.stages)


@torch.no_grad()
def test_from_timm_plain_stock_resnet_gives_its_outputs():
    stock = timm.create_model("resnet18", num_classes=10).eval()
    model = RSkipResNetForImageClassification.from_timm(stock, skip_variant="plain").eval()
    assert (model.config.backbone, model.config.num_labels) == ("rskip_resnet18", 10)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(model(x).logits, stock(x))


def test_from_timm_stock_resnet_gets_new_skip_norms_by_default():
    stock = timm.create_model("resnet18", num_classes=10)
    model = RSkipResNetForImageClassification.from_timm(stock)
    assert model.config.skip_variant == "rskip_ln" and model.config.skip_recursions == 2
    state = model.timm_model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in stock.state_dict().items())
    assert all(torch.all(state[key] == (1.0 if key.endswith("weight") else 0.0)) for key in skip_keys(state))


@torch.no_grad()
def test_from_timm_save_for_hf_folder_keeps_variant_and_classes(tmp_path):
    source = randomize(timm.create_model("preact_resnet20", skip_variant="rskip_bn", skip_recursions=3, num_classes=7))
    timm.models.save_for_hf(source, tmp_path, safe_serialization=True)
    model = RSkipResNetForImageClassification.from_timm(tmp_path).eval()
    config = model.config
    assert (config.backbone, config.skip_variant, config.skip_recursions, config.num_labels) == (
        "preact_resnet20", "rskip_bn", 3, 7)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x).logits, source(x))


def test_from_timm_head_of_another_size_raises_unless_ignored():
    source = timm.create_model("preact_resnet20", num_classes=10)
    with pytest.raises(ValueError, match=r"classifier has 10 classes, num_labels=5; .*ignore_mismatched_sizes=True"):
        RSkipResNetForImageClassification.from_timm(source, num_labels=5)
    model = RSkipResNetForImageClassification.from_timm(source, num_labels=5, ignore_mismatched_sizes=True)
    assert model.timm_model.head.fc.weight.shape == (5, 64, 1, 1)
    headless = RSkipResNetModel.from_timm(source)
    assert torch.equal(headless.timm_model.stem.conv.weight, source.stem.conv.weight)


def test_from_timm_state_dict_needs_a_backbone_that_fits():
    state_dict = timm.create_model("preact_resnet20", skip_variant="rskip_bn").state_dict()
    with pytest.raises(ValueError, match=r"backbone=None: name the timm model of the state dict; allowed: preact"):
        RSkipResNetForImageClassification.from_timm(state_dict)
    with pytest.raises(ValueError, match=r"does not fit backbone='preact_resnet20' with skip_variant='rskip_ln'"):
        RSkipResNetForImageClassification.from_timm(state_dict, backbone="preact_resnet20", num_labels=10)
    model = RSkipResNetForImageClassification.from_timm(state_dict, backbone="preact_resnet20", num_labels=10,
                                                         skip_variant="rskip_bn")
    assert model.timm_model.state_dict().keys() == state_dict.keys()


def test_from_timm_patched_resnet_keeps_its_skip_connection():
    patched = patch_timm_resnet(timm.create_model("resnet18", num_classes=3), skip_variant="xskip", skip_scale=0.5)
    config = RSkipResNetForImageClassification.from_timm(patched).config
    assert (config.backbone, config.skip_variant, config.skip_scale, config.num_labels) == (
        "rskip_resnet18", "xskip", 0.5, 3)


def test_from_timm_names_the_stock_architecture_of_a_patched_resnet_it_has_no_backbone_for():
    patched = patch_timm_resnet(timm.create_model("seresnet18"), skip_variant="post_ln")
    with pytest.raises(ValueError, match=r"architecture='seresnet18' has no rskip counterpart; allowed: "):
        RSkipResNetForImageClassification.from_timm(patched)
