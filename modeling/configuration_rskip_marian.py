"""RSkipMarian model configuration."""

import copy

from transformers import MarianConfig

from .pipeline_translation import TranslationPipeline
from .residual import SkipOptions

# Saved with every config so that `pipeline("translation", model=folder, trust_remote_code=True)` works:
# transformers 5 has no translation pipeline of its own.
TRANSLATION_PIPELINE = {
    "translation": {
        "impl": f"{TranslationPipeline.__module__.rsplit('.', 1)[-1]}.{TranslationPipeline.__name__}",
        "pt": ["AutoModelForSeq2SeqLM"],
        "type": "text",
    }
}


class RSkipMarianConfig(MarianConfig):
    r"""
    A [`MarianConfig`] with the residual connection of every sublayer chosen from the family of
    Liu et al. (COLING 2020). All Marian fields keep their meaning and defaults.

    skip_variant (`str`, *optional*, defaults to `"rskip_ln"`):
        One of `plain`, `post_ln`, `pre_ln`, `xskip`, `xskip_ln`, `rskip_ln`, `xskip_bn`, `rskip_bn`.
        `post_ln` is stock Marian.
    skip_scale (`float`, *optional*, defaults to 1.0):
        λ of the `xskip*` variants, multiplying the sublayer input before the add; must be > 0.
    skip_recursions (`int`, *optional*, defaults to 2):
        K of the `rskip*` variants: y_k = LN_k(x + y_{k-1}), k = 1..K. K = 1 is `post_ln`.
    skip_share_norm (`bool`, *optional*, defaults to `False`):
        `rskip*` only: one norm for all K steps instead of one per step.
    skip_learnable_scale (`bool`, *optional*, defaults to `False`):
        `xskip*` only: learn λ (one scalar per sublayer, initialised at `skip_scale`).
    pad_token_id (`int`, *optional*, defaults to `vocab_size - 1`):
        Marian's convention (58100 with Marian's default vocabulary).
    decoder_start_token_id (`int`, *optional*, defaults to `pad_token_id`):
        Marian starts decoding with the pad token.

    An option the chosen variant does not use must keep its default; otherwise a `ValueError`
    says which option is set and which variants use it.

    Example:

    ```python
    >>> from rskip import RSkipMarianConfig, RSkipMarianMTModel

    >>> config = RSkipMarianConfig(vocab_size=8000, d_model=512, skip_variant="rskip_ln", skip_recursions=2)
    >>> model = RSkipMarianMTModel(config)
    ```"""

    model_type = "rskip_marian"
    skip_variant: str = "rskip_ln"
    skip_scale: float = 1.0
    skip_recursions: int = 2
    skip_share_norm: bool = False
    skip_learnable_scale: bool = False

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
