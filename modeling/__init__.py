"""rskip: the recursive skip connection with layer normalization (rSkip+LN) and its residual family."""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer, MarianTokenizer

from .configuration_rskip_marian import RSkipMarianConfig
from .modeling_rskip_marian import RSkipMarianModel, RSkipMarianMTModel, RSkipMarianPreTrainedModel
from .pipeline_translation import TranslationPipeline
from .residual import SKIP_VARIANTS, SkipOptions, create_skip

__all__ = [
    "SKIP_VARIANTS",
    "SkipOptions",
    "create_skip",
    "RSkipMarianConfig",
    "RSkipMarianPreTrainedModel",
    "RSkipMarianModel",
    "RSkipMarianMTModel",
    "TranslationPipeline",
]

# Translation models: Auto classes here, and `auto_map` plus copied code in every saved folder.
AutoConfig.register(RSkipMarianConfig.model_type, RSkipMarianConfig, exist_ok=True)
AutoModel.register(RSkipMarianConfig, RSkipMarianModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(RSkipMarianConfig, RSkipMarianMTModel, exist_ok=True)
AutoTokenizer.register(RSkipMarianConfig, slow_tokenizer_class=MarianTokenizer, exist_ok=True)
RSkipMarianConfig.register_for_auto_class()
RSkipMarianModel.register_for_auto_class("AutoModel")
RSkipMarianMTModel.register_for_auto_class("AutoModelForSeq2SeqLM")
