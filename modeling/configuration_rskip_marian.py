"""RSkipMarian model configuration."""

import copy

from .library_versions import require_versions, tested_ranges

# First: with older transformers the imports and classes below would fail deep inside it.
require_versions("transformers")

from huggingface_hub.errors import StrictDataclassFieldValidationError  # noqa: E402
from transformers import MarianConfig  # noqa: E402

from .pipeline_translation import TranslationPipeline  # noqa: E402
from .skip_options import (  # noqa: E402
    ConfigFieldError,
    SkipOptions,
    check_number,
    holds_numbers,
    plain_int,
    with_skip_docs,
)

# Saved with every config so that `pipeline("translation", model=folder, trust_remote_code=True)` works:
# transformers 5 has no translation pipeline of its own.
TRANSLATION_PIPELINE = {
    "translation": {
        "impl": f"{TranslationPipeline.__module__.rsplit('.', 1)[-1]}.{TranslationPipeline.__name__}",
        "pt": ["AutoModelForSeq2SeqLM"],
        "type": "text",
    }
}


@with_skip_docs(SkipOptions)
class RSkipMarianConfig(MarianConfig, SkipOptions.config_fields()):
    r"""
    A [`MarianConfig`] with the residual connection of every sublayer chosen from the family of
    Liu et al. (COLING 2020). All Marian fields keep their meaning and defaults.

    {skip_options}
    pad_token_id (`int`, *optional*, defaults to `vocab_size - 1`):
        Marian's convention (58100 with Marian's default vocabulary).
    decoder_start_token_id (`int`, *optional*, defaults to `pad_token_id`):
        Marian starts decoding with the pad token.

    An option the chosen variant does not use must keep its default. Integral numbers (numpy integers,
    say) are taken where an `int` is, and stored as plain `int`s. A bad value raises `ConfigFieldError`
    (a `ValueError` whose `field`, `value` and `allowed` say what is wrong): a skip option, a keyword
    that starts with `skip_` but is no skip option, a Marian field of the wrong type, a width, head
    count or layer count out of range, a `d_model` that the attention heads do not divide, or a
    dropout rate outside [0, 1]. Other keywords pass to [`MarianConfig`] unchanged.

    Example:

    ```python
    >>> from rskip import RSkipMarianConfig, RSkipMarianMTModel

    >>> config = RSkipMarianConfig(vocab_size=8000, d_model=512, skip_variant="rskip_ln", skip_recursions=2)
    >>> model = RSkipMarianMTModel(config)
    ```"""

    model_type = "rskip_marian"

    def __post_init__(self, **kwargs):
        SkipOptions.refuse_unknown(kwargs, type(self).__name__)
        self.skip_options()
        self.check_shapes()
        # Marian's convention, pad = decoder start = the last id, also when only `vocab_size` is given.
        marian_default = MarianConfig.__dataclass_fields__["pad_token_id"].default
        if self.pad_token_id == marian_default and self.vocab_size <= marian_default:
            self.pad_token_id = self.vocab_size - 1
        if self.decoder_start_token_id == marian_default and self.vocab_size <= marian_default:
            self.decoder_start_token_id = self.pad_token_id
        kwargs["custom_pipelines"] = {**kwargs.get("custom_pipelines", {}), **copy.deepcopy(TRANSLATION_PIPELINE)}
        super().__post_init__(**kwargs)

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        # A stock Marian checkpoint is patched on load: its config is ours with the default skip_* fields.
        if config_dict.get("model_type") == MarianConfig.model_type:
            config_dict["model_type"] = cls.model_type
        return config_dict, kwargs

    def __setattr__(self, name, given):
        field = self.__dataclass_fields__.get(name)
        # A numpy integer from a grid is an int.
        value = plain_int(given) if field is not None and holds_numbers(field.type) else given
        # MarianConfig is a strict dataclass whose type errors are no ValueError and name no allowed type.
        try:
            super().__setattr__(name, value)
        except StrictDataclassFieldValidationError as error:
            allowed = field.type
            raise ConfigFieldError(name, given, getattr(allowed, "__name__", str(allowed)),
                                   f"has the wrong type ({type(given).__name__})") from error

    def check_shapes(self) -> None:
        """The sizes and rates that the layers would reject, or crash on, only when built or run."""
        for name in ("d_model", "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim",
                     "decoder_ffn_dim"):
            check_number(name, getattr(self, name), 1, integer=True)
        for name in ("encoder_layers", "decoder_layers"):
            check_number(name, getattr(self, name), 0, integer=True)
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, name):
                raise ConfigFieldError("d_model", self.d_model, f"a multiple of {name}={getattr(self, name)}",
                                       "is not divisible by the number of attention heads")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            check_number(name, getattr(self, name), 0, 1)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # `from_pretrained(folder, skip_recursion=3)` would drop a keyword that is no attribute without a word.
        SkipOptions.refuse_unknown(kwargs, cls.__name__)
        return super().from_dict(config_dict, **kwargs)

    def skip_options(self) -> SkipOptions:
        """The validated `skip_*` fields."""
        return SkipOptions.from_object(self)

    def to_dict(self) -> dict:
        # config.json tells the folder's users which library versions its code is tested with.
        return {**super().to_dict(), "rskip_compatibility": tested_ranges("transformers")}


__all__ = ["RSkipMarianConfig"]
