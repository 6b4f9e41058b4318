"""Property tests of the two configs: any combination of `skip_*` values and of a few shape fields (plain or numpy
numbers, or a misspelt `skip_*` keyword) either builds a model that runs forward and backward and saves (as JSON)
and loads back with equal outputs, or fails at once, when the config or the model is created, with a `ValueError`
naming the field (`ConfigFieldError.field`, or ``<field>=`` opening the message). Nothing else: no TypeError, and no
model that crashes later."""

import json
import math
import numbers
import tempfile
from pathlib import Path

import numpy as np

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rskip import (
    SKIP_VARIANTS,
    ConfigFieldError,
    ResNetSkipOptions,
    RSkipMarianConfig,
    RSkipMarianMTModel,
    RSkipResNetConfig,
    RSkipResNetForImageClassification,
)

# Fixed examples (derandomize), so that a run is reproducible; about 60 s in all on 2 CPU cores.
def property_settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

# What a grid built with numpy holds: integers, and no bool, wherever an int goes.
NUMPY_INTEGERS = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint64)
# Any value: of the right type or not, in range or not.
ANY = st.one_of(st.integers(-2, 4), st.floats(allow_nan=True, allow_infinity=True, width=32), st.booleans(),
                st.sampled_from(["", "1", "rskip", "POST_LN", None]),
                st.tuples(st.sampled_from(NUMPY_INTEGERS), st.integers(0, 4)).map(lambda pair: pair[0](pair[1])),
                st.sampled_from([np.bool_(True), np.bool_(False), np.float64(0.5), np.float64("nan")]))
# The skip options, each with values it may take; combinations of them may still be refused.
SKIP_FIELDS = {
    "skip_variant": st.sampled_from(SKIP_VARIANTS),
    "skip_scale": st.floats(0.25, 2.0),
    "skip_recursions": st.integers(1, 3),
    "skip_share_norm": st.booleans(),
    "skip_learnable_scale": st.booleans(),
}


def as_numpy(value):
    """An int as a numpy integer (that can hold it), anything else unchanged: what a grid built with numpy gives."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (np.int64 if value < 0 else np.uint8)(value)
    return value


def misspelt(name: str) -> st.SearchStrategy[str]:
    """`name` with one letter after ``skip_`` dropped, doubled or changed, or a letter added or dropped at its end."""
    tail = name[len("skip_"):]
    edits = st.integers(0, len(tail) - 1).flatmap(lambda at: st.sampled_from([
        tail[:at] + tail[at + 1:], tail[:at] + tail[at] * 2 + tail[at + 1:], tail[:at] + "x" + tail[at + 1:],
        tail + "s", tail[:-1]]))
    return edits.map(lambda edited: "skip_" + edited).filter(lambda edited: edited != name)


def configs(fields: dict) -> st.SearchStrategy[dict]:
    """Some of `fields` with values from their strategies, their integers half the time numpy integers, and, three
    times in four, one of them with any value (two of those three) or one skip option under a misspelt name."""
    one_wild = st.sampled_from(sorted(fields)).flatmap(lambda name: ANY.map(lambda value: {name: value}))
    one_misspelt = st.sampled_from(sorted(name for name in fields if name.startswith("skip_"))).flatmap(
        lambda name: st.tuples(misspelt(name), fields[name]).map(lambda pair: {pair[0]: pair[1]}))
    drawn = st.fixed_dictionaries({}, optional=fields)
    drawn = st.one_of(drawn, drawn.map(lambda values: {name: as_numpy(value) for name, value in values.items()}))
    return st.tuples(drawn, st.one_of(st.just({}), one_wild, one_wild, one_misspelt)).map(
        lambda pair: {**pair[0], **pair[1]})


def assert_names_a_given_field(error: ValueError, given: dict) -> None:
    """`error` names one of the fields set in `given`, with its value where it is a `ConfigFieldError` (or, for a pair
    of fields that do not fit, such as `d_model` and a head count, names the given one with its value)."""
    if isinstance(error, ConfigFieldError) and error.field in given:
        assert error.value is given[error.field] or error.value == given[error.field] or (
            isinstance(error.value, float) and math.isnan(error.value)), error
    elif isinstance(error, ConfigFieldError):
        assert any(f"{name}={given[name]}" in error.allowed for name in given), error
    else:
        assert any(str(error).startswith(f"{name}=") for name in given), error


def check_model(config_class, model_class, kwargs: dict, given: dict, make_inputs, outputs_of) -> None:
    try:
        model = model_class(config_class(**kwargs))
    except ValueError as error:
        assert_names_a_given_field(error, given)
        return

    # Training: forward with a loss, backward, gradients that are numbers.
    torch.manual_seed(0)
    model.train()
    loss = model(**make_inputs()).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    # Save (numbers as plain JSON numbers) and load back: the same config and the same outputs.
    model.eval()
    inputs = make_inputs()
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        expected = outputs_of(model, inputs)
        model.save_pretrained(folder)
        saved = json.loads(Path(folder, "config.json").read_text())
        for name, value in given.items():
            stored = getattr(model.config, name)
            assert stored == value and (type(stored) is type(value) or type(stored) is int), (name, value, stored)
            assert saved.get(name, stored) == stored, (name, saved.get(name))  # num_labels is saved as id2label
        loaded = model_class.from_pretrained(folder).eval()
        assert {**loaded.config.to_dict(), "_name_or_path": ""} == model.config.to_dict()
        torch.testing.assert_close(outputs_of(loaded, inputs), expected, rtol=0, atol=0)


TINY_MARIAN = dict(vocab_size=40, max_position_embeddings=16, pad_token_id=1, eos_token_id=2,
                   decoder_start_token_id=1, forced_eos_token_id=None)
MARIAN_FIELDS = {
    **SKIP_FIELDS,
    "d_model": st.sampled_from([4, 6, 8, 12]),
    "encoder_attention_heads": st.integers(1, 4),
    "decoder_attention_heads": st.integers(1, 4),
    "encoder_layers": st.integers(0, 2),
    "decoder_layers": st.integers(0, 2),
    "encoder_ffn_dim": st.integers(1, 8),
    "dropout": st.floats(0.0, 1.0),
    "attention_dropout": st.floats(0.0, 1.0),
}


def marian_inputs() -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, TINY_MARIAN["vocab_size"], (2, 6), generator=generator)
    labels = torch.randint(3, TINY_MARIAN["vocab_size"], (2, 4), generator=generator)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)


@property_settings(60)
@given(given=configs(MARIAN_FIELDS))
# What this test found: TypeErrors of the strict MarianConfig, and values the layers reject only when built or run.
@example(given={"d_model": False})
@example(given={"attention_dropout": False})
@example(given={"d_model": 1})  # not divisible by 2 heads
@example(given={"decoder_attention_heads": 0})
@example(given={"dropout": -1})
# Reported by users: a numpy K, numpy shapes (config.json must stay JSON), a misspelt K.
@example(given={"skip_variant": "rskip_ln", "skip_recursions": np.int64(3)})
@example(given={"d_model": np.int32(12), "encoder_attention_heads": np.uint8(3), "decoder_layers": np.int8(2)})
@example(given={"skip_variant": "rskip_ln", "skip_recursion": 3})
def test_any_marian_config_builds_a_working_model_or_names_its_bad_field(given):
    # Shapes kept tiny where not drawn.
    kwargs = {"d_model": 8, "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_layers": 1,
              "decoder_layers": 1, "encoder_ffn_dim": 8, "decoder_ffn_dim": 8, **TINY_MARIAN, **given}
    check_model(RSkipMarianConfig, RSkipMarianMTModel, kwargs, given, marian_inputs,
                lambda model, inputs: model(**inputs).logits)


RESNET_FIELDS = {
    **SKIP_FIELDS,
    "skip_norm_dims": st.sampled_from(["chw", "c"]),
    "in_chans": st.integers(1, 4),
    "drop_rate": st.floats(0.0, 1.0),
    "drop_path_rate": st.floats(0.0, 1.0),
    "num_labels": st.integers(1, 4),
}


@property_settings(40)
@given(given=configs(RESNET_FIELDS))
# What this test found: rates that torch rejects (or crashes on) only when built, and a TypeError of num_labels.
@example(given={"drop_rate": -1})
@example(given={"drop_rate": float("nan")})
@example(given={"drop_path_rate": 2})
@example(given={"drop_path_rate": ""})
@example(given={"num_labels": 0.0})
@example(given={"skip_recursions": np.int64(3), "in_chans": np.int16(1), "num_labels": np.uint8(3)})
@example(given={"skip_recursoins": 3})
def test_any_resnet_config_builds_a_working_model_or_names_its_bad_field(given):
    kwargs = {"backbone": "preact_resnet20", **given}
    # Only used where the config takes them: integral numbers then.
    in_chans, num_labels = (int(value) if isinstance(value, numbers.Integral) else 3
                            for value in (given.get("in_chans", 3), given.get("num_labels", 2)))

    def inputs() -> dict:
        generator = torch.Generator().manual_seed(0)
        pixel_values = torch.randn(2, in_chans, 16, 16, generator=generator)
        return dict(pixel_values=pixel_values, labels=torch.tensor([0, max(num_labels - 1, 0)]))

    check_model(RSkipResNetConfig, RSkipResNetForImageClassification, kwargs, given, inputs,
                lambda model, inputs: model(inputs["pixel_values"]).logits)


@pytest.mark.parametrize("config_class, kwargs, message", [
    (RSkipResNetConfig, dict(drop_rate=1.5), "drop_rate=1.5 is out of range; allowed: a number in [0, 1]"),
    (RSkipResNetConfig, dict(drop_path_rate="0.1"),
     "drop_path_rate='0.1' is not a number; allowed: a number in [0, 1]"),
    (RSkipResNetConfig, dict(num_labels=2.5), "num_labels=2.5 is not an integer; allowed: an integer >= 0"),
    (RSkipMarianConfig, dict(d_model=10, encoder_attention_heads=4),
     "d_model=10 is not divisible by the number of attention heads; allowed: a multiple of encoder_attention_heads=4"),
    (RSkipMarianConfig, dict(d_model=8, encoder_attention_heads=2, decoder_attention_heads=0),
     "decoder_attention_heads=0 is out of range; allowed: an integer >= 1"),
    (RSkipMarianConfig, dict(encoder_ffn_dim="8"), "encoder_ffn_dim='8' has the wrong type (str); allowed: int"),
    (RSkipMarianConfig, dict(activation_dropout=-0.1), "activation_dropout=-0.1 is out of range; allowed: a number in "
                                                       "[0, 1]"),
])
def test_a_bad_shape_or_rate_names_the_field_and_what_is_allowed(config_class, kwargs, message):
    with pytest.raises(ConfigFieldError) as error:
        config_class(**kwargs)
    assert str(error.value) == message
    assert error.value.field == message.partition("=")[0]


@pytest.mark.parametrize("config_class", [RSkipMarianConfig, RSkipResNetConfig])
@property_settings(40)
@given(data=st.data())
def test_a_misspelt_skip_option_is_refused_naming_the_option_meant(config_class, data):
    options = sorted(spec for spec in ResNetSkipOptions.__dataclass_fields__
                     if config_class is RSkipResNetConfig or spec != "skip_norm_dims")
    meant = data.draw(st.sampled_from(options))
    name = data.draw(misspelt(meant))
    value = data.draw(SKIP_FIELDS.get(meant, st.sampled_from(["chw", "c"])))
    with pytest.raises(ConfigFieldError) as error:
        config_class(**{name: value})
    assert (error.value.field, error.value.value) == (name, value)
    assert f"is not an option of {config_class.__name__} (did you mean {meant}?)" in str(error.value)
    assert error.value.allowed == ", ".join(option for option in ResNetSkipOptions.__dataclass_fields__
                                            if option in options)


@pytest.mark.parametrize("config_class, kwargs", [
    # Reported by users: K = 2 was built without a word.
    (RSkipMarianConfig, dict(skip_variant="rskip_ln", skip_recursion=3)),
    (RSkipResNetConfig, dict(backbone="preact_resnet20", skip_recursoins=3)),
])
def test_the_misspelt_recursion_depth_names_skip_recursions(config_class, kwargs):
    misspelling = next(name for name in kwargs if name not in ("skip_variant", "backbone"))
    with pytest.raises(ValueError, match=f"^{misspelling}=3 is not an option of {config_class.__name__} "
                                         r"\(did you mean skip_recursions\?\); allowed: skip_variant, "):
        config_class(**kwargs)


@pytest.mark.parametrize("model_class, config", [
    (RSkipMarianMTModel, RSkipMarianConfig(**TINY_MARIAN, d_model=8, encoder_attention_heads=2, decoder_attention_heads=2,
                                           encoder_layers=1, decoder_layers=1, encoder_ffn_dim=8, decoder_ffn_dim=8)),
    (RSkipResNetForImageClassification, RSkipResNetConfig(backbone="preact_resnet20")),
])
def test_a_misspelt_skip_option_given_to_from_pretrained_is_refused(model_class, config, tmp_path):
    # transformers' from_pretrained would drop a keyword that is no config attribute.
    model_class(config).save_pretrained(tmp_path)
    for load in (model_class.from_pretrained, type(config).from_pretrained):
        with pytest.raises(ConfigFieldError, match=r"^skip_recursion=3 is not an option of \w+ \(did you mean "
                                                   r"skip_recursions\?\)"):
            load(tmp_path, skip_recursion=3)
    assert model_class.from_pretrained(tmp_path, skip_variant="rskip_ln", skip_recursions=np.int64(3)).config.to_dict(
        )["skip_recursions"] == 3

@pytest.mark.parametrize("config_class, kwargs", [
    # Stock keywords, and others that only start like a skip option, are stored as before.
    (RSkipMarianConfig, dict(scale_embedding=True, activation_function="relu", skip=1, skipping="yes")),
    (RSkipResNetConfig, dict(global_pool="avg", skip=1, skipper_note="kept")),
])
def test_keywords_that_are_not_skip_options_pass_through(config_class, kwargs):
    config = config_class(**kwargs)
    assert {name: getattr(config, name) for name in kwargs} == kwargs
    assert {name: config_class.from_dict(config.to_dict()).__getattribute__(name) for name in kwargs} == kwargs


@pytest.mark.parametrize("config_class, fields", [(RSkipMarianConfig, MARIAN_FIELDS), (RSkipResNetConfig,
                                                                                       RESNET_FIELDS)])
@property_settings(40)
@given(data=st.data())
def test_numpy_integers_make_the_same_config_as_plain_ints(config_class, fields, data):
    plain = data.draw(st.fixed_dictionaries({}, optional=fields))
    numpy = {name: data.draw(st.sampled_from(NUMPY_INTEGERS)).__call__(value)
             if isinstance(value, int) and not isinstance(value, bool) else value for name, value in plain.items()}
    try:
        expected = config_class(**plain).to_dict()
    except ValueError as error:
        with pytest.raises(ValueError) as numpy_error:
            config_class(**numpy)
        assert str(numpy_error.value).partition("=")[0] == str(error).partition("=")[0]
        return
    config = config_class(**numpy)
    assert config.to_dict() == expected
    assert all(type(getattr(config, name)) is type(value) for name, value in plain.items())
    json.loads(config.to_json_string())


@pytest.mark.parametrize("config_class, name", [
    (RSkipMarianConfig, "skip_recursions"), (RSkipMarianConfig, "d_model"), (RSkipResNetConfig, "skip_recursions"),
    (RSkipResNetConfig, "in_chans"), (RSkipResNetConfig, "num_labels"),
])
@pytest.mark.parametrize("value", [True, np.bool_(True)])
def test_a_bool_is_no_integer(config_class, name, value):
    kwargs = {name: value, "skip_variant": "rskip_ln"} if name == "skip_recursions" else {name: value}
    with pytest.raises(ConfigFieldError) as error:
        config_class(**kwargs)
    assert (error.value.field, error.value.value) == (name, value)
