"""RSkipMarian: equations inside the layers, exactness against stock Marian, and the transformers features users rely on."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSeq2SeqLM,
    MarianConfig,
    MarianMTModel,
)

from rskip import SKIP_VARIANTS, RSkipMarianConfig, RSkipMarianModel, RSkipMarianMTModel

TINY = dict(
    vocab_size=99,
    d_model=16,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=12,
    decoder_ffn_dim=12,
    max_position_embeddings=64,
    pad_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
    forced_eos_token_id=None,
    dropout=0.0,
)
# Options each variant needs to differ from its default behaviour.
VARIANT_OPTIONS = {
    "plain": {},
    "post_ln": {},
    "pre_ln": {},
    "xskip": dict(skip_scale=0.9),
    "xskip_ln": dict(skip_scale=1.5, skip_learnable_scale=True),
    "rskip_ln": dict(skip_recursions=3),
    "xskip_bn": dict(skip_scale=0.8),
    "rskip_bn": dict(skip_recursions=2, skip_share_norm=True),
}


def perturb_(model, seed=0):
    """Random norm affines and biases, so that a norm or bias used in the wrong place shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim <= 1:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def inputs(seed=0, batch=3, length=7, vocab=99):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, -2:] = TINY["pad_token_id"]
    attention_mask[0, -2:] = 0
    decoder_input_ids = torch.randint(3, vocab, (batch, 5), generator=generator)
    return dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)


def rskip_model(variant="rskip_ln", **options):
    torch.manual_seed(0)
    config = RSkipMarianConfig(**TINY, skip_variant=variant, **{**VARIANT_OPTIONS.get(variant, {}), **options})
    return perturb_(RSkipMarianMTModel(config)).eval()


@pytest.fixture(scope="module")
def stock_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb_(MarianMTModel(MarianConfig(**TINY)))
    path = tmp_path_factory.mktemp("stock-marian")
    model.save_pretrained(path)
    return path


# --- The skip connection inside the layers --------------------------------------------------------------------------


def ln(z, norm):
    return F.layer_norm(z, z.shape[-1:], norm.weight, norm.bias, norm.eps)


def test_encoder_layer_is_rskip_equation():
    model = rskip_model("rskip_ln", skip_recursions=2)
    layer = model.model.encoder.layers[0]
    x = torch.randn(2, 5, 16)
    attn = layer.self_attn_layer_norm
    ffn = layer.final_layer_norm

    h = layer.self_attn(x, attention_mask=None)[0]
    y = ln(x + ln(x + h, attn), attn.recursion_norms[0])
    h = layer.fc2(layer.activation_fn(layer.fc1(y)))
    expected = ln(y + ln(y + h, ffn), ffn.recursion_norms[0])

    torch.testing.assert_close(layer(x, None), expected)


def test_decoder_layer_applies_the_skip_to_all_three_sublayers():
    model = rskip_model("rskip_ln", skip_recursions=2)
    layer = model.model.decoder.layers[0]
    x, memory = torch.randn(2, 4, 16), torch.randn(2, 6, 16)

    def rskip(x, h, norm):
        return ln(x + ln(x + h, norm), norm.recursion_norms[0])

    y = rskip(x, layer.self_attn(x, attention_mask=None)[0], layer.self_attn_layer_norm)
    y = rskip(y, layer.encoder_attn(y, key_value_states=memory, attention_mask=None)[0], layer.encoder_attn_layer_norm)
    expected = rskip(y, layer.fc2(layer.activation_fn(layer.fc1(y))), layer.final_layer_norm)

    torch.testing.assert_close(layer(x, None, memory, cache=None, use_cache=False), expected)


def test_pre_ln_normalises_branch_inputs_and_ends_each_stack_with_a_layer_norm():
    model = rskip_model("pre_ln")
    layer = model.model.encoder.layers[0]
    x = torch.randn(2, 5, 16)
    y = x + layer.self_attn(ln(x, layer.self_attn_layer_norm), attention_mask=None)[0]
    expected = y + layer.fc2(layer.activation_fn(layer.fc1(ln(y, layer.final_layer_norm))))
    torch.testing.assert_close(layer(x, None), expected)

    encoder = model.model.encoder
    hidden = torch.randn(2, 5, 16)
    out = encoder(inputs_embeds=hidden, output_hidden_states=True)
    last_layer_output = encoder.layers[-1](out.hidden_states[-2], None)
    torch.testing.assert_close(out.last_hidden_state, ln(last_layer_output, encoder.layer_norm))
    # hidden_states[-1] is the normalised stack output, as in mBART
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    assert {"model.encoder.layer_norm.weight", "model.decoder.layer_norm.weight"} <= model.state_dict().keys()


@pytest.mark.parametrize("variant", ["plain", "xskip"])
def test_variants_without_norm_have_no_norm_parameters(variant):
    model = rskip_model(variant)
    assert not [name for name in model.state_dict() if "layer_norm" in name]


# --- Exactness against stock Marian ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [dict(skip_variant="post_ln"), dict(skip_variant="rskip_ln", skip_recursions=1),
     dict(skip_variant="xskip_ln", skip_scale=1.0)],
    ids=["post_ln", "rskip_ln-K1", "xskip_ln-lambda1"],
)
def test_reproduces_stock_marian(stock_dir, options):
    stock = MarianMTModel.from_pretrained(stock_dir).eval()
    model, info = RSkipMarianMTModel.from_pretrained(stock_dir, output_loading_info=True, **options)
    model.eval()
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()

    batch = inputs()
    with torch.no_grad():
        assert (model(**batch).logits - stock(**batch).logits).abs().max() <= 1e-5
    for generate_kwargs in (dict(num_beams=1), dict(num_beams=4)):
        expected = stock.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=8,
                                  **generate_kwargs)
        actual = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=8,
                                **generate_kwargs)
        assert torch.equal(actual, expected)


def test_rskip_k2_differs_from_stock(stock_dir):
    stock = MarianMTModel.from_pretrained(stock_dir).eval()
    model = RSkipMarianMTModel.from_pretrained(stock_dir, skip_variant="rskip_ln", skip_recursions=2).eval()
    batch = inputs()
    with torch.no_grad():
        assert (model(**batch).logits - stock(**batch).logits).abs().max() > 1e-2


def test_patching_marian_only_adds_identity_norms(stock_dir):
    model, info = RSkipMarianMTModel.from_pretrained(stock_dir, skip_variant="rskip_ln", skip_recursions=3,
                                                     output_loading_info=True)
    assert info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert info["missing_keys"] and all(".recursion_norms." in key for key in info["missing_keys"])
    state = model.state_dict()
    for key in info["missing_keys"]:
        expected = torch.ones_like(state[key]) if key.endswith("weight") else torch.zeros_like(state[key])
        assert torch.equal(state[key], expected), key
    assert len(info["missing_keys"]) == 2 * 2 * (2 * 2 + 2 * 3)  # (K-1) norms x (weight, bias) x sublayers

    model, info = RSkipMarianMTModel.from_pretrained(stock_dir, skip_variant="pre_ln", output_loading_info=True)
    assert info["missing_keys"] == {f"model.{stack}.layer_norm.{p}" for stack in ("encoder", "decoder")
                                    for p in ("weight", "bias")}


def test_patching_marian_into_a_norm_free_variant_reports_the_unused_norms(stock_dir):
    _, info = RSkipMarianMTModel.from_pretrained(stock_dir, skip_variant="plain", output_loading_info=True)
    assert info["missing_keys"] == set()
    assert info["unexpected_keys"] and all("layer_norm" in key for key in info["unexpected_keys"])


# --- Save, load, Auto classes, remote code ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", SKIP_VARIANTS)
def test_save_load_roundtrip_every_variant(tmp_path, variant):
    model = rskip_model(variant)
    model.save_pretrained(tmp_path)
    loaded, info = RSkipMarianMTModel.from_pretrained(tmp_path, output_loading_info=True)
    assert all(not keys for keys in (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]))
    assert loaded.config.skip_variant == variant
    batch = inputs()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch).logits, model(**batch).logits)


def test_auto_classes_know_the_model(tmp_path):
    config = AutoConfig.for_model("rskip_marian", **TINY)
    assert isinstance(config, RSkipMarianConfig)
    assert isinstance(AutoModelForSeq2SeqLM.from_config(config), RSkipMarianMTModel)
    assert isinstance(AutoModel.from_config(config), RSkipMarianModel)

    rskip_model().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "rskip_marian"
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_rskip_marian.RSkipMarianConfig",
        "AutoModelForSeq2SeqLM": "modeling_rskip_marian.RSkipMarianMTModel",
    }
    for name in ("configuration_rskip_marian.py", "modeling_rskip_marian.py", "residual.py", "skip_options.py"):
        assert (tmp_path / name).exists()
    assert isinstance(AutoModelForSeq2SeqLM.from_pretrained(tmp_path), RSkipMarianMTModel)


def test_base_model_loads_from_a_translation_checkpoint(tmp_path):
    model = rskip_model()
    model.save_pretrained(tmp_path)
    base = RSkipMarianModel.from_pretrained(tmp_path).eval()
    batch = inputs()
    with torch.no_grad():
        assert torch.equal(base(**batch).last_hidden_state, model.model(**batch).last_hidden_state)


REMOTE_SCRIPT = """
import sys
sys.modules["rskip"] = None  # the package is not importable here
try:
    import rskip
except ImportError:
    pass
else:
    raise SystemExit("rskip should not be importable")
import torch
from transformers import AutoModelForSeq2SeqLM
folder, batch_file, out_file = sys.argv[1:]
model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()
batch = torch.load(batch_file)
with torch.no_grad():
    logits = model(**batch).logits
tokens = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=2, max_new_tokens=6)
torch.save({"logits": logits, "tokens": tokens, "class": type(model).__name__}, out_file)
"""


@pytest.mark.parametrize("variant", ["rskip_ln", "pre_ln"])
def test_saved_folder_runs_where_rskip_is_not_installed(tmp_path, variant, run_python):
    model = rskip_model(variant)
    model.save_pretrained(tmp_path / "model")
    batch = inputs()
    torch.save(batch, tmp_path / "batch.pt")
    run_python(REMOTE_SCRIPT, tmp_path / "model", tmp_path / "batch.pt", tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt")
    assert out["class"] == "RSkipMarianMTModel"
    with torch.no_grad():
        assert torch.equal(out["logits"], model(**batch).logits)
    tokens = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=2, max_new_tokens=6)
    assert torch.equal(out["tokens"], tokens)


# --- transformers features --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["rskip_ln", "pre_ln", "xskip_bn"])
def test_cached_generation_equals_uncached(variant):
    model = rskip_model(variant)
    batch = inputs()
    common = dict(attention_mask=batch["attention_mask"], max_new_tokens=8, min_new_tokens=8)
    for kwargs in (dict(num_beams=1), dict(num_beams=3), dict(do_sample=True, top_k=20)):
        torch.manual_seed(0)
        cached = model.generate(batch["input_ids"], use_cache=True, **common, **kwargs)
        torch.manual_seed(0)
        uncached = model.generate(batch["input_ids"], use_cache=False, **common, **kwargs)
        assert cached.shape[1] == 9
        assert torch.equal(cached, uncached), kwargs


def test_eager_and_sdpa_attention_agree():
    model = rskip_model()
    batch = inputs()
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(**batch).logits
        model.set_attn_implementation("sdpa")
        sdpa = model(**batch).logits
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = inputs()
    labels = batch.pop("decoder_input_ids")
    gradients = []
    for checkpointing in (False, True):
        model = rskip_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**batch, labels=labels).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[0][name], gradients[1][name], msg=name)



@pytest.mark.parametrize("model_class", [RSkipMarianModel, RSkipMarianMTModel])
@pytest.mark.parametrize("variant", ["post_ln", "pre_ln", "rskip_ln"])
def test_the_legacy_gradient_checkpointing_switch_checkpoints_every_layer(model_class, variant):
    # The config switch stock Marian honours: its first module built consumed it, then ours replaced that module.
    model = model_class(RSkipMarianConfig(**TINY, skip_variant=variant, gradient_checkpointing=True)).train()
    layers = [*model.get_encoder().layers, *model.get_decoder().layers]
    checkpointed = []
    for layer in layers:
        checkpoint = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *args, _layer=layer, _checkpoint=checkpoint, **kwargs: (
            checkpointed.append(_layer), _checkpoint(*args, **kwargs))[1]
    model(**inputs())[0].sum().backward()  # the last hidden state, or the logits
    assert checkpointed == layers
    assert "gradient_checkpointing" not in model.config.to_dict()  # consumed, as transformers does, not saved

def test_hidden_states_and_attentions_are_returned():
    model = rskip_model()
    model.set_attn_implementation("eager")  # sdpa does not return attention weights
    out = model(**inputs(), output_hidden_states=True, output_attentions=True)
    assert len(out.encoder_hidden_states) == 3 and len(out.decoder_hidden_states) == 3
    assert len(out.encoder_attentions) == 2 and len(out.decoder_attentions) == 2 and len(out.cross_attentions) == 2
    assert out.encoder_attentions[0].shape == (3, 4, 7, 7)
    assert out.cross_attentions[0].shape == (3, 4, 5, 7)
    torch.testing.assert_close(out.decoder_attentions[1].sum(-1), torch.ones(3, 4, 5))
    torch.testing.assert_close(out.encoder_hidden_states[-1], out.encoder_last_hidden_state)
    layer_out = model.model.encoder.layers[0](out.encoder_hidden_states[0], None)
    assert layer_out.shape == out.encoder_hidden_states[1].shape


def test_bf16_autocast_forward_and_backward():
    model = rskip_model().train()
    batch = inputs()
    labels = batch.pop("decoder_input_ids")
    with torch.no_grad():
        reference = model(**batch, labels=labels).logits
    dtypes = []
    model.model.decoder.layers[-1].fc1.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, labels=labels)
    assert dtypes == [torch.bfloat16]
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(out.logits.float(), reference, atol=0.1, rtol=0.05)


def test_bf16_weights_generate():
    model = rskip_model().to(torch.bfloat16)
    batch = inputs()
    tokens = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=2, max_new_tokens=5)
    assert tokens.shape[0] == 3


def test_learnable_scale_is_saved_and_initialised(tmp_path, stock_dir):
    model = rskip_model("xskip_ln", skip_scale=1.5, skip_learnable_scale=True)
    scale = model.model.encoder.layers[0].self_attn_layer_norm.scale
    assert scale.requires_grad and scale.ndim == 0
    patched = RSkipMarianMTModel.from_pretrained(stock_dir, skip_variant="xskip_ln", skip_scale=1.5,
                                                 skip_learnable_scale=True)
    assert patched.model.decoder.layers[1].final_layer_norm.scale.item() == 1.5
    with torch.no_grad():
        scale.fill_(0.25)
    model.save_pretrained(tmp_path)
    loaded = RSkipMarianMTModel.from_pretrained(tmp_path)
    assert loaded.model.encoder.layers[0].self_attn_layer_norm.scale.item() == 0.25


# --- Bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, words",
    [
        (dict(skip_variant="rskip_lnn"), ["skip_variant", "'rskip_lnn'", "rskip_ln"]),
        (dict(skip_recursions=0), ["skip_recursions", "0", ">= 1"]),
        (dict(skip_recursions=2.5), ["skip_recursions", "2.5", "integer"]),
        (dict(skip_variant="xskip", skip_scale=-0.5), ["skip_scale", "-0.5", "> 0"]),
        (dict(skip_variant="post_ln", skip_recursions=4), ["skip_recursions", "4", "post_ln", "rskip_ln"]),
        (dict(skip_variant="pre_ln", skip_scale=2.0), ["skip_scale", "2.0", "pre_ln", "xskip"]),
    ],
)
def test_bad_config_values_raise_value_error(options, words):
    with pytest.raises(ValueError) as error:
        RSkipMarianConfig(**TINY, **options)
    for word in words:
        assert word in str(error.value)


def test_bad_value_in_config_json_raises_value_error(tmp_path):
    rskip_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["skip_recursions"] = -1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="skip_recursions=-1 is not a valid recursion depth K; allowed: an integer >= 1"):
        RSkipMarianMTModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="skip_recursions=-1"):
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path)


def test_bad_override_when_loading_raises_value_error(stock_dir):
    with pytest.raises(ValueError, match="skip_variant='rskip'"):
        RSkipMarianMTModel.from_pretrained(stock_dir, skip_variant="rskip")
    with pytest.raises(ValueError, match="skip_share_norm=True is set but skip_variant='post_ln'"):
        RSkipMarianMTModel.from_pretrained(stock_dir, skip_variant="post_ln", skip_share_norm=True)


def test_checkpoint_with_other_shapes_fails_clearly(tmp_path):
    rskip_model().save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        RSkipMarianMTModel.from_pretrained(tmp_path, encoder_ffn_dim=20)


def test_pad_and_decoder_start_follow_marians_last_id_convention():
    assert RSkipMarianConfig().pad_token_id == MarianConfig().pad_token_id == 58100
    config = RSkipMarianConfig(vocab_size=8000)
    assert config.pad_token_id == config.decoder_start_token_id == 7999
    config = RSkipMarianConfig(vocab_size=8000, pad_token_id=3)
    assert config.pad_token_id == config.decoder_start_token_id == 3
    assert RSkipMarianConfig(vocab_size=8000, pad_token_id=3, decoder_start_token_id=5).decoder_start_token_id == 5
