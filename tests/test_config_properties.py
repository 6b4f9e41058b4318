"""Property tests of the two configs: any combination of `skip_*` values and of a few shape fields either builds a
model that runs forward and backward and saves and loads back with equal outputs, or fails at once, when the config
or the model is created, with a `ValueError` naming the field (`ConfigFieldError.field`, or ``<field>=`` opening the
message). Nothing else: no TypeError, and no model that crashes later."""

import math
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rskip import (
    SKIP_VARIANTS,
    ConfigFieldError,
    RSkipMarianConfig,
    RSkipMarianMTModel,
    RSkipResNetConfig,
    RSkipResNetForImageClassification,
)

# Fixed examples (derandomize), so that a run is reproducible; about 60 s in all on 2 CPU cores.
def property_settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

# Any value: of the right type or not, in range or not.
ANY = st.one_of(st.integers(-2, 4), st.floats(allow_nan=True, allow_infinity=True, width=32), st.booleans(),
                st.sampled_from(["", "1", "rskip", "POST_LN", None]))
# The skip options, each with values it may take; combinations of them may still be refused.
SKIP_FIELDS = {
    "skip_variant": st.sampled_from(SKIP_VARIANTS),
    "skip_scale": st.floats(0.25, 2.0),
    "skip_recursions": st.integers(1, 3),
    "skip_share_norm": st.booleans(),
    "skip_learnable_scale": st.booleans(),
}


def configs(fields: dict) -> st.SearchStrategy[dict]:
    """Some of `fields` with values from their strategies, and, two times in three, one of them with any value."""
    one_wild = st.sampled_from(sorted(fields)).flatmap(lambda name: ANY.map(lambda value: {name: value}))
    return st.tuples(st.fixed_dictionaries({}, optional=fields), st.one_of(st.just({}), one_wild, one_wild)).map(
        lambda pair: {**pair[0], **pair[1]})


def assert_names_a_given_field(error: ValueError, given: dict) -> None:
    """`error` names one of the fields set in `given`, with its value where it is a `ConfigFieldError`."""
    if isinstance(error, ConfigFieldError):
        assert error.field in given, error
        assert error.value is given[error.field] or error.value == given[error.field] or (
            isinstance(error.value, float) and math.isnan(error.value)), error
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

    # Save and load back: the same outputs.
    model.eval()
    inputs = make_inputs()
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        expected = outputs_of(model, inputs)
        model.save_pretrained(folder)
        loaded = model_class.from_pretrained(folder).eval()
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
def test_any_resnet_config_builds_a_working_model_or_names_its_bad_field(given):
    kwargs = {"backbone": "preact_resnet20", **given}
    in_chans = given.get("in_chans", 3)
    num_labels = given.get("num_labels", 2)

    def inputs() -> dict:
        generator = torch.Generator().manual_seed(0)
        pixel_values = torch.randn(2, in_chans if isinstance(in_chans, int) else 3, 16, 16, generator=generator)
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
