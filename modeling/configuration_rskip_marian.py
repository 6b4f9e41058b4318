"""RSkipMarian model configuration."""

import copy

from transformers import MarianConfig

from .pipeline_translation import TranslationPipeline
from .skip_options import SkipOptions, with_skip_docs

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

    An option the chosen variant does not use must keep its default. A bad value raises
    `ConfigFieldError` (a `ValueError` whose `field`, `value` and `allowed` say what is wrong).

    Example:

    ```python
    >>> from rskip import RSkipMarianConfig, RSkipMarianMTModel

    >>> config = RSkipMarianConfig(vocab_size=8000, d_model=512, skip_variant="rskip_ln", skip_recursions=2)
    >>> model = RSkipMarianMTModel(config)
    ```"""

    model_type = "rskip_marian"

    def __post_init__(self, **kwargs):
        self.skip_options()
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

    def skip_options(self) -> SkipOptions:
        """The validated `skip_*` fields."""
        return SkipOptions.from_object(self)


__all__ = ["RSkipMarianConfig"]
