"""Deployment: torch.export programs and ONNX files equal PyTorch; the ONNX Runtime translator equals `generate`.

Tiny random models built here (CPU, offline). Each translation variant is exported once (module-scoped fixture).
"""

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from transformers import MarianConfig, MarianMTModel

import rskip
from rskip import RSkipMarianConfig, RSkipMarianMTModel, RSkipResNetConfig, RSkipResNetForImageClassification
from rskip.commands import export as export_command
from rskip.fused_skip import skip_norm
from rskip.export import export_image_classifier, export_translation_model, onnx_path
from rskip.onnx_translation import OnnxTranslator

TOLERANCE = 1e-4
PAD, EOS = 98, 0
TINY_MARIAN = dict(vocab_size=99, d_model=16, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32,
                   decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
                   max_position_embeddings=64, pad_token_id=PAD, decoder_start_token_id=PAD, eos_token_id=EOS,
                   forced_eos_token_id=EOS,
                   # Peaked output distributions: beam search over near-uniform ones would hinge on float noise.
                   init_std=0.5)
TRANSLATION_VARIANTS = {
    "post_ln": {"skip_variant": "post_ln"},
    "rskip_ln-K2": {"skip_variant": "rskip_ln", "skip_recursions": 2},
    "rskip_ln-K3": {"skip_variant": "rskip_ln", "skip_recursions": 3},
    "xskip_ln": {"skip_variant": "xskip_ln", "skip_scale": 0.5},
    "pre_ln": {"skip_variant": "pre_ln"},
    "xskip_bn": {"skip_variant": "xskip_bn", "skip_scale": 2.0},
    "rskip_bn-K2": {"skip_variant": "rskip_bn", "skip_recursions": 2},
}


def source_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four sources of different lengths, padded: the encoder mask and the beams' cache order both matter."""
    input_ids = torch.randint(1, PAD, (4, 7), generator=torch.Generator().manual_seed(1))
    for row, length in enumerate((7, 4, 6, 3)):
        input_ids[row, length - 1] = EOS
        input_ids[row, length:] = PAD
    return input_ids, (input_ids != PAD).long()


def tiny_translation_model(**skip_options) -> RSkipMarianMTModel:
    torch.manual_seed(0)
    model = RSkipMarianMTModel(RSkipMarianConfig(**TINY_MARIAN, **skip_options))
    if "bn" in skip_options["skip_variant"]:  # running statistics of a real batch, not the initial (0, 1)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.momentum = None  # a cumulative average: after one batch, that batch's statistics
        model.train()
        with torch.no_grad():
            model(*source_batch(), decoder_input_ids=torch.full((4, 3), 5))
    model.eval()
    # What scripts/train_translation.py saves: beam 4, a length limit, no pad token, a forced final EOS.
    model.generation_config.update(num_beams=4, max_new_tokens=10, max_length=None, bad_words_ids=[[PAD]],
                                   forced_eos_token_id=EOS, decoder_start_token_id=PAD, eos_token_id=EOS,
                                   pad_token_id=PAD)
    return model


_EXPORTS = {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, monkeypatch_module):
    """`exported(variant)`: the model and the folder it was exported to, once per variant. Exported as a user
    would, with the fused op on and gradients enabled; the calls of the op are counted."""
    fused_calls = []
    monkeypatch_module.setattr(rskip.residual, "skip_norm", lambda *args: fused_calls.append(1) or skip_norm(*args))

    def export(variant: str):
        if variant not in _EXPORTS:
            model = tiny_translation_model(**TRANSLATION_VARIANTS[variant])
            folder = tmp_path_factory.mktemp(f"export-{variant}")
            with rskip.use_fused_skip(True), torch.enable_grad():
                export_translation_model(model, folder)
            _EXPORTS[variant] = model, folder
        return _EXPORTS[variant]

    export.fused_calls = fused_calls
    return export


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def teacher_forced_logits(translator: OnnxTranslator, input_ids, attention_mask, decoder_input_ids) -> np.ndarray:
    """The decoder step run position by position over `decoder_input_ids`, its cache carried along."""
    encoded = translator.encode(input_ids.numpy(), attention_mask.numpy())
    past = translator.empty_cache(input_ids.shape[0])
    steps = []
    for position in range(decoder_input_ids.shape[1]):
        logits, past = translator.decode_step(decoder_input_ids[:, position].numpy(), attention_mask.numpy(), past,
                                              encoded[1:])
        steps.append(logits)
    return np.stack(steps, axis=1)


@pytest.mark.parametrize("variant", list(TRANSLATION_VARIANTS))
def test_onnx_runtime_equals_pytorch_logits_greedy_and_beam(exported, variant):
    model, folder = exported(variant)
    translator = OnnxTranslator(folder)
    input_ids, attention_mask = source_batch()
    decoder_input_ids = torch.cat([torch.full((4, 1), PAD), torch.randint(1, PAD, (4, 4))], dim=1)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
    hidden = translator.encode(input_ids.numpy(), attention_mask.numpy())[0]
    assert np.abs(hidden - expected.encoder_last_hidden_state.numpy()).max() <= TOLERANCE
    logits = teacher_forced_logits(translator, input_ids, attention_mask, decoder_input_ids)
    assert np.abs(logits - expected.logits.numpy()).max() <= TOLERANCE
    for num_beams in (1, 4):
        with torch.no_grad():
            tokens = model.generate(input_ids, attention_mask=attention_mask, num_beams=num_beams).numpy()
        np.testing.assert_array_equal(
            translator.generate(input_ids.numpy(), attention_mask.numpy(), num_beams=num_beams), tokens)


def test_folder_generation_config_drives_search(exported):
    """No overrides: the saved generation config (beam 4, 10 new tokens, forced EOS at the limit) gives generate's
    tokens, also without an attention mask (for encoder-decoder models generate then attends to every position)."""
    model, folder = exported("rskip_ln-K2")
    input_ids, _ = source_batch()
    with torch.no_grad():
        expected = model.generate(input_ids).numpy()
    assert expected.shape[1] == 11 and expected[:, -1].tolist().count(EOS) >= 1  # the forced EOS was used
    np.testing.assert_array_equal(OnnxTranslator(folder).generate(input_ids.numpy()), expected)


def test_torch_export_programs_equal_pytorch(exported):
    model, folder = exported("rskip_ln-K3")
    input_ids, attention_mask = source_batch()
    encoder = torch.export.load(folder / "encoder.pt2").module()
    step = torch.export.load(folder / "decoder_step.pt2").module()
    n, heads = model.config.decoder_layers, model.config.decoder_attention_heads
    with torch.no_grad():
        hidden, *cross = encoder(input_ids, attention_mask)
        start = torch.full((4, 1), PAD)
        logits, *present = step(start, attention_mask, (*[torch.zeros(4, heads, 0, 8)] * (2 * n), *cross))
        expected = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=start)
    assert torch.allclose(hidden, expected.encoder_last_hidden_state, atol=TOLERANCE)
    assert torch.allclose(logits, expected.logits, atol=TOLERANCE)
    assert [tensor.shape[2] for tensor in present] == [1] * (2 * n)


def test_fused_op_exports_as_layer_norm_nodes(exported):
    """Exported with the fused op on and gradients enabled, where the model runs the op: the files hold plain
    LayerNormalization nodes (K per residual sublayer) and no custom op, and give the op's outputs."""
    model, folder = exported("rskip_ln-K2")
    assert not exported.fused_calls  # no export ran the op
    exported.fused_calls.clear()
    for name, sublayers in (("encoder", 2 * 1), ("decoder_step", 3 * 2)):
        proto = onnx.load(onnx_path(folder, name))
        op_types = [node.op_type for node in proto.graph.node]
        assert op_types.count("LayerNormalization") == 2 * sublayers, name
        assert not any("skip" in op.lower() for op in op_types + [function.name for function in proto.functions])
    input_ids, attention_mask = source_batch()
    decoder_input_ids = torch.full((4, 1), PAD)
    with rskip.use_fused_skip(True), torch.enable_grad():
        fused = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
    assert len(exported.fused_calls) == 2 * 1 + 3 * 2  # every residual sublayer ran the op
    logits = teacher_forced_logits(OnnxTranslator(folder), input_ids, attention_mask, decoder_input_ids)
    assert np.abs(logits - fused.logits.detach().numpy()).max() <= TOLERANCE


def test_stock_marian_checkpoint_patched_with_rskip_exports(tmp_path, capsys):
    torch.manual_seed(0)
    stock = MarianMTModel(MarianConfig(**{key: value for key, value in TINY_MARIAN.items()}))
    stock.generation_config.update(num_beams=4, max_new_tokens=8, bad_words_ids=[[PAD]])
    stock.save_pretrained(tmp_path / "stock")
    manifest = export_command.main([str(tmp_path / "stock"), "--output_dir", str(tmp_path / "out"),
                                    "--skip_variant", "rskip_ln", "--skip_recursions", "2", "--int8"])
    assert manifest["model_class"] == "RSkipMarianMTModel"
    assert manifest["skip_options"] == {"skip_variant": "rskip_ln", "skip_recursions": 2, "skip_share_norm": False}
    assert manifest["max_abs_logits_difference"]["fp32"] <= TOLERANCE
    assert "max |Δ logits|" in capsys.readouterr().out
    patched = RSkipMarianMTModel.from_pretrained(tmp_path / "stock", skip_variant="rskip_ln", skip_recursions=2)
    input_ids, attention_mask = source_batch()
    with torch.no_grad():
        expected = patched.eval().generate(input_ids, attention_mask=attention_mask).numpy()
    np.testing.assert_array_equal(OnnxTranslator(tmp_path / "out").generate(input_ids.numpy(),
                                                                             attention_mask.numpy()), expected)
    # int8: ONNX Runtime's dynamic quantisation (integer matrix products), and it still translates
    int8_ops = {node.op_type for node in onnx.load(onnx_path(tmp_path / "out", "decoder_step", int8=True)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= int8_ops
    tokens = OnnxTranslator(tmp_path / "out", int8=True).generate(input_ids.numpy(), attention_mask.numpy())
    assert tokens.shape[0] == 4 and (tokens[:, 0] == PAD).all() and tokens.shape[1] <= 9


RESNET_VARIANTS = {
    "plain": {"skip_variant": "plain"},
    "rskip_ln-K2": {"skip_variant": "rskip_ln", "skip_recursions": 2},
    "rskip_ln-K3-c": {"skip_variant": "rskip_ln", "skip_recursions": 3, "skip_norm_dims": "c"},
    "xskip_ln-learned": {"skip_variant": "xskip_ln", "skip_scale": 0.5, "skip_learnable_scale": True},
    "pre_ln": {"skip_variant": "pre_ln"},
    "xskip_bn": {"skip_variant": "xskip_bn", "skip_scale": 0.5},
    "rskip_bn": {"skip_variant": "rskip_bn", "skip_recursions": 2},
}


@pytest.mark.parametrize("variant", list(RESNET_VARIANTS))
def test_resnet_onnx_equals_pytorch(variant, tmp_path):
    torch.manual_seed(0)
    # PreAct-ResNet with one block per stage (two with a projection shortcut), narrow: seconds to export.
    model = timm.create_model("preact_resnet20", num_classes=10, layers=(1, 1, 1), channels=(8, 16, 16), stem_width=8,
                              **RESNET_VARIANTS[variant]).eval()
    manifest = export_image_classifier(model, tmp_path)
    assert manifest["input_size"] == [3, 32, 32] and len(manifest["mean"]) == 3
    pixel_values = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values).numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"pixel_values": pixel_values.numpy()})
    assert np.abs(logits - expected).max() <= TOLERANCE
    program = torch.export.load(tmp_path / "model.pt2").module()
    assert torch.allclose(program(pixel_values), torch.from_numpy(expected), atol=TOLERANCE)


def test_transformers_resnet_folder_and_patched_timm_resnet_export(tmp_path):
    torch.manual_seed(0)
    RSkipResNetForImageClassification(RSkipResNetConfig(backbone="preact_resnet20", num_labels=4,
                                                         skip_variant="rskip_ln")).save_pretrained(tmp_path / "hf")
    manifest = export_command.main([str(tmp_path / "hf"), "--output_dir", str(tmp_path / "hf-out")])
    assert manifest["max_abs_logits_difference"]["fp32"] <= TOLERANCE
    assert manifest["skip_options"]["skip_variant"] == "rskip_ln"
    manifest = export_command.main(["resnet10t", "--skip_variant", "rskip_ln", "--skip_recursions", "3",
                                    "--image_size", "64", "--output_dir", str(tmp_path / "timm-out")])
    assert manifest["input_size"] == [3, 64, 64]
    assert manifest["max_abs_logits_difference"]["fp32"] <= TOLERANCE
    graph = onnx.load(tmp_path / "timm-out" / "model.onnx").graph
    # GroupNorm(1, C) over (C, H, W): K = 3 norms in each of resnet10t's 4 blocks
    norms = [node for node in graph.node if node.op_type in ("GroupNormalization", "LayerNormalization",
                                                                "InstanceNormalization")]
    assert len(norms) >= 12


# Errors, before any work --------------------------------------------------------------------------------------------


def usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        export_command.main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_bad_sources_are_refused_before_any_work(tmp_path, capsys):
    output = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    error = usage_error(capsys, [str(tmp_path / "empty"), "--output_dir", str(output)])
    assert "usage:" in error and "has no config.json" in error and str(tmp_path / "empty") in error
    error = usage_error(capsys, [str(tmp_path / "missing"), "--output_dir", str(output)])
    assert "no such folder" in error
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    error = usage_error(capsys, [str(tmp_path / "bert"), "--output_dir", str(output)])
    assert "model_type 'bert' is not supported" in error and "rskip_marian" in error
    error = usage_error(capsys, ["vit_tiny_patch16_224", "--output_dir", str(output)])
    assert "'vit_tiny_patch16_224' is not a ResNet" in error
    error = usage_error(capsys, ["nobody/no-such-model", "--output_dir", str(output)])  # offline: no Hub
    assert "nobody/no-such-model: neither a folder, a timm model name nor a Hub model id" in error
    assert not output.exists()


def test_unsupported_options_are_refused_before_any_work(tmp_path, capsys):
    output = tmp_path / "out"
    error = usage_error(capsys, ["resnet10t", "--skip_variant", "rskip_lnn", "--output_dir", str(output)])
    assert "--skip_variant" in error and "'rskip_lnn'" in error and "rskip_ln" in error
    error = usage_error(capsys, ["resnet10t", "--skip_variant", "post_ln", "--skip_recursions", "3",
                                 "--output_dir", str(output)])
    assert "argument --skip_recursions" in error and "does not use it" in error
    error = usage_error(capsys, ["resnet10t", "--opset", "9", "--output_dir", str(output)])
    assert "argument --opset" in error and "'9'" in error and ">= 18" in error
    RSkipResNetForImageClassification(RSkipResNetConfig(backbone="preact_resnet20", num_labels=2)).save_pretrained(
        tmp_path / "hf")
    error = usage_error(capsys, [str(tmp_path / "hf"), "--skip_variant", "post_ln", "--output_dir", str(output)])
    assert "has its own skip connection" in error
    torch.manual_seed(0)
    MarianMTModel(MarianConfig(**TINY_MARIAN)).save_pretrained(tmp_path / "stock")
    error = usage_error(capsys, [str(tmp_path / "stock"), "--image_size", "64", "--output_dir", str(output)])
    assert "argument --image_size" in error and "translation" in error
    error = usage_error(capsys, [str(tmp_path / "stock"), "--skip_norm_dims", "c", "--output_dir", str(output)])
    assert "skip_norm_dims" in error
    assert not output.exists()


def test_translator_refuses_settings_it_cannot_reproduce(exported, tmp_path):
    translator = OnnxTranslator(exported("post_ln")[1])
    input_ids, attention_mask = source_batch()
    with pytest.raises(ValueError, match=r"repetition_penalty=1.2 is not supported .* allowed: 1.0"):
        translator.generate(input_ids.numpy(), attention_mask.numpy(), repetition_penalty=1.2)
    with pytest.raises(ValueError, match=r"bad_words_ids has a sequence of 2 tokens"):
        translator.generate(input_ids.numpy(), attention_mask.numpy(), bad_words_ids=[[5, 6]])
    with pytest.raises(FileNotFoundError, match="no export.json"):
        OnnxTranslator(tmp_path / "elsewhere")


def test_benchmark_flags_are_checked_before_any_work(tmp_path, capsys):
    from rskip.commands import benchmark_deploy

    output = tmp_path / "out"
    for argv, expected in (
        (["--batch_sizes", "1,0"], "argument --batch_sizes: expected integers >= 1 separated by commas, got '1,0'"),
        (["--model_preset", "huge"], "argument --model_preset: invalid choice: 'huge'"),
        (["--bleu_model", str(tmp_path)], "give both or neither"),
        (["--bleu_model", str(tmp_path), "--bleu_data", str(tmp_path / "test")], "has no config.json"),
    ):
        with pytest.raises(SystemExit) as stop:
            benchmark_deploy.main(["--output_dir", str(output), *argv])
        assert stop.value.code == 2
        error = capsys.readouterr().err
        assert "usage:" in error and expected in error
    assert not output.exists()
