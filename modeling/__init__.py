"""rskip: the recursive skip connection with layer normalization (rSkip+LN) and its residual family.

Importing the package registers the models with transformers' Auto classes (and, for saved folders, `auto_map`
plus the copied code) and the ResNets with timm's model registry.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    MarianTokenizer,
)

from .configuration_rskip_marian import RSkipMarianConfig
from .configuration_rskip_resnet import RSkipResNetConfig
from .modeling_rskip_marian import RSkipMarianModel, RSkipMarianMTModel, RSkipMarianPreTrainedModel
from .modeling_rskip_resnet import RSkipResNetForImageClassification, RSkipResNetModel, RSkipResNetPreTrainedModel
from .pipeline_translation import TranslationPipeline
from .fused_skip import use_fused_skip, use_triton
from .residual import create_skip
from .skip_options import SKIP_VARIANTS, ConfigFieldError, ResNetSkipOptions, SkipOptions
from .timm_resnets import (
    CifarPreActResNet,
    RSkipBasicBlock,
    RSkipBottleneck,
    RSkipPreActBasic,
    RSkipPreActBottleneck,
    patch_timm_resnet,
)
from .weights_files import CorruptWeightsFileError

__all__ = [
    "SKIP_VARIANTS",
    "SkipOptions",
    "ConfigFieldError",
    "create_skip",
    "use_fused_skip",
    "use_triton",
    "CorruptWeightsFileError",
    # translation
    "RSkipMarianConfig",
    "RSkipMarianPreTrainedModel",
    "RSkipMarianModel",
    "RSkipMarianMTModel",
    "TranslationPipeline",
    # image classification
    "ResNetSkipOptions",
    "RSkipBasicBlock",
    "RSkipBottleneck",
    "RSkipPreActBasic",
    "RSkipPreActBottleneck",
    "CifarPreActResNet",
    "patch_timm_resnet",
    "RSkipResNetConfig",
    "RSkipResNetPreTrainedModel",
    "RSkipResNetModel",
    "RSkipResNetForImageClassification",
]

AutoConfig.register(RSkipMarianConfig.model_type, RSkipMarianConfig, exist_ok=True)
AutoModel.register(RSkipMarianConfig, RSkipMarianModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(RSkipMarianConfig, RSkipMarianMTModel, exist_ok=True)
AutoTokenizer.register(RSkipMarianConfig, slow_tokenizer_class=MarianTokenizer, exist_ok=True)
RSkipMarianConfig.register_for_auto_class()
RSkipMarianModel.register_for_auto_class("AutoModel")
RSkipMarianMTModel.register_for_auto_class("AutoModelForSeq2SeqLM")

AutoConfig.register(RSkipResNetConfig.model_type, RSkipResNetConfig, exist_ok=True)
AutoModel.register(RSkipResNetConfig, RSkipResNetModel, exist_ok=True)
AutoModelForImageClassification.register(RSkipResNetConfig, RSkipResNetForImageClassification, exist_ok=True)
RSkipResNetConfig.register_for_auto_class()
RSkipResNetModel.register_for_auto_class("AutoModel")
RSkipResNetForImageClassification.register_for_auto_class("AutoModelForImageClassification")
