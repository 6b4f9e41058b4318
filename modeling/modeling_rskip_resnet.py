"""timm ResNets with the residual family of Liu et al., "Rethinking Skip Connection with Layer Normalization in
Transformers and ResNets" (COLING 2020, arXiv:2105.07205), as transformers models.

The network is the timm model named by `config.backbone`, built by this folder's `timm_resnets` (so a saved folder
needs only torch, timm and transformers), under `timm_model` as in transformers' TimmWrapper. Each block returns
skip(s, F(x)) for its shortcut s, e.g. rSkip+LN with K = 2: y = LN_2(s + LN_1(s + F(x))).
"""

import inspect
import math
import os
from collections.abc import Mapping

import timm
import torch
from torch import nn
from transformers import BitImageProcessor, PreTrainedModel
from transformers import initialization as init
from transformers.image_utils import PILImageResampling
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention, ImageClassifierOutputWithNoAttention

from .configuration_rskip_resnet import BACKBONES, RSkipResNetConfig
from .timm_resnets import create_backbone, rskip_architecture
from .weights_files import WeightsFileCheckMixin

# transformers < 5.10 copies into a saved folder's module cache only the files that the loaded file itself imports:
# these are the rest of what this file needs (through the files above).
from .fused_skip import skip_norm  # noqa: F401
from .fused_skip_triton import supports  # noqa: F401  (imported by `fused_skip` in a form the copy does not follow)
from .library_versions import require_versions  # noqa: F401
from .residual import create_skip  # noqa: F401
from .skip_options import ResNetSkipOptions  # noqa: F401

# `PreTrainedModel._initialize_weights` (private) takes `is_custom_code` from transformers 5.13.
_SKIPS_CUSTOM_CODE = "is_custom_code" in inspect.signature(PreTrainedModel._initialize_weights).parameters
_RESAMPLING = {"bilinear": PILImageResampling.BILINEAR, "bicubic": PILImageResampling.BICUBIC}


def _create_timm_model(config: RSkipResNetConfig, num_classes: int) -> nn.Module:
    return create_backbone(
        config.backbone,
        num_classes=num_classes,
        in_chans=config.in_chans,
        drop_rate=config.drop_rate,
        drop_path_rate=config.drop_path_rate,
        **config.skip_options().to_dict(),
    )


class RSkipResNetPreTrainedModel(WeightsFileCheckMixin, PreTrainedModel):
    config: RSkipResNetConfig
    base_model_prefix = "timm_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    # Trainer then scales the loss for gradient accumulation itself.
    accepts_loss_kwargs = False

    def _init_weights(self, module):
        """timm's initialisation, through torch's init functions, which transformers guards while it initialises:
        `from_pretrained` (which builds the model on the meta device) initialises exactly what the checkpoint lacks."""
        if isinstance(module, nn.Linear):
            module.reset_parameters()  # torch's default, which timm's ResNet classifier keeps
        elif not isinstance(module, nn.Conv2d):
            super()._init_weights(module)  # norms: weight 1, bias 0, fresh running statistics
        if isinstance(getattr(module, "scale", None), nn.Parameter):
            init.constant_(module.scale, module.initial_scale)
        if module is self.timm_model:
            module.init_weights()  # convolutions, and zero-init of the branch's last norm where timm does it

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # transformers >= 5.13 skips custom-code modules without parameters of their own, such as the timm model whose
        # `init_weights` covers the convolutions; `_init_weights` only uses guarded functions, so none is skipped.
        super()._initialize_weights(module, **({"is_custom_code": False} if _SKIPS_CUSTOM_CODE else {}))

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs):
        self.timm_model.set_grad_checkpointing(enable)

    def _features(self, pixel_values: torch.Tensor, output_hidden_states: bool | None):
        """The network's unpooled features and, with `output_hidden_states`, the stem's and stages' outputs."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.in_chans:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected (batch, {self.config.in_chans}, height, "
                f"width) for config.in_chans={self.config.in_chans}"
            )
        if output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states:
            last_hidden_state, hidden_states = self.timm_model.forward_intermediates(pixel_values)
            return last_hidden_state, tuple(hidden_states)
        return self.timm_model.forward_features(pixel_values), None

    def create_image_processor(self) -> BitImageProcessor:
        """timm's evaluation preprocessing for this model (resize the shorter side to size / crop_pct, center crop,
        normalise) as a transformers image processor."""
        data_config = timm.data.resolve_data_config(model=self.timm_model)
        _, height, width = data_config["input_size"]
        return BitImageProcessor(
            size={"shortest_edge": math.floor(min(height, width) / data_config["crop_pct"])},
            crop_size={"height": height, "width": width},
            resample=_RESAMPLING[data_config["interpolation"]],
            image_mean=list(data_config["mean"]),
            image_std=list(data_config["std"]),
            do_convert_rgb=self.config.in_chans == 3,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus `create_image_processor()` saved alongside, so that
        `pipeline("image-classification", model=save_directory)` works. (Upload with `push_to_hub()`, which saves
        through this method; `save_pretrained(push_to_hub=True)` uploads before the processor is written.)"""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            self.create_image_processor().save_pretrained(save_directory)

    @classmethod
    def from_timm(cls, source, ignore_mismatched_sizes: bool = False, **config_kwargs):
        """Load a timm checkpoint into this class, in one call.

        ``source`` is a timm model (stock resnet18/34/50/101/152, patched or not, or one of rskip's), a name that
        `timm.create_model(..., pretrained=True)` loads (`local-dir:` or plain path to a `save_for_hf` folder,
        `hf-hub:` repo, timm model name with weights) or a timm state dict (then ``config_kwargs`` names the
        `backbone`). The source's skip options and class count are kept unless ``config_kwargs`` (fields of
        `RSkipResNetConfig`) override them; weights the source lacks are the new skip norms, at their initial values.
        A classifier of another size is an error unless ``ignore_mismatched_sizes`` (then the head is new).
        """
        if isinstance(source, Mapping):
            state_dict = source
        else:
            if not isinstance(source, nn.Module):
                source = timm.create_model(f"local-dir:{source}" if os.path.isdir(source) else source, pretrained=True)
            state_dict = source.state_dict()
            config_kwargs = {**_config_kwargs_of(source), **config_kwargs}
        if "backbone" not in config_kwargs:
            raise ValueError(
                f"backbone=None: name the timm model of the state dict; allowed: {', '.join(BACKBONES)}"
            )
        model = cls(RSkipResNetConfig(**config_kwargs))
        model._load_timm_state_dict(state_dict, ignore_mismatched_sizes)
        return model

    def _load_timm_state_dict(self, state_dict: Mapping[str, torch.Tensor], ignore_mismatched_sizes: bool) -> None:
        own = self.timm_model.state_dict()
        classifier = self.timm_model.pretrained_cfg["classifier"] + "."
        head = {key for key in state_dict if key.startswith(classifier)}
        mismatched = {key for key in head if key not in own or own[key].shape != state_dict[key].shape}
        if mismatched and self.timm_model.num_classes and not ignore_mismatched_sizes:
            source_classes = state_dict[classifier + "weight"].shape[0] if classifier + "weight" in state_dict else 0
            raise ValueError(
                f"the checkpoint's classifier has {source_classes} classes, num_labels={self.config.num_labels}; "
                f"pass num_labels={source_classes}, or ignore_mismatched_sizes=True to train a new classifier"
            )
        state_dict = {key: value for key, value in state_dict.items() if key not in mismatched}
        missing, unexpected = self.timm_model.load_state_dict(state_dict, strict=False)
        missing = [key for key in missing if ".skip." not in key and key not in mismatched]
        if missing or unexpected:
            raise ValueError(
                f"the checkpoint does not fit backbone={self.config.backbone!r} with skip_variant="
                f"{self.config.skip_variant!r}: missing {missing[:5]}, unexpected {unexpected[:5]} (the only weights "
                "it may lack are the skip connection's)"
            )


def _config_kwargs_of(timm_model: nn.Module) -> dict:
    """The `RSkipResNetConfig` fields describing a timm model: its architecture and recorded model arguments."""
    model_args = timm.models.get_model_args(timm_model)
    # A patched timm ResNet without an `rskip_*` counterpart names its architecture there (`patch_timm_resnet`).
    architecture = model_args.pop("timm_architecture", None) or timm_model.pretrained_cfg["architecture"]
    if model_args.get("global_pool", "avg") != "avg":
        raise ValueError(f"global_pool={model_args['global_pool']!r}: RSkipResNetConfig models pool with 'avg'")
    config_fields = set(RSkipResNetConfig.__dataclass_fields__)
    unsupported = sorted(set(model_args) - config_fields - {"num_classes", "global_pool"})
    if unsupported:
        raise ValueError(f"model arguments {unsupported} have no RSkipResNetConfig field; allowed: skip_*, in_chans")
    kwargs = {key: value for key, value in model_args.items() if key in config_fields}
    if timm_model.num_classes:
        kwargs["num_labels"] = timm_model.num_classes
    return dict(kwargs, backbone=rskip_architecture(architecture))


class RSkipResNetModel(RSkipResNetPreTrainedModel):
    """The network without its classifier; `pooler_output` holds the pooled features."""

    def __init__(self, config: RSkipResNetConfig):
        super().__init__(config)
        self.timm_model = _create_timm_model(config, num_classes=0)
        self.post_init()

    def forward(
            self,
            pixel_values: torch.Tensor,
            output_hidden_states: bool | None = None,
            return_dict: bool | None = None,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple[torch.Tensor, ...]:
        last_hidden_state, hidden_states = self._features(pixel_values, output_hidden_states)
        pooler_output = self.timm_model.forward_head(last_hidden_state, pre_logits=True)

        if not (return_dict if return_dict is not None else self.config.return_dict):
            return tuple(value for value in (last_hidden_state, pooler_output, hidden_states) if value is not None)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last_hidden_state, pooler_output=pooler_output, hidden_states=hidden_states,
        )


class RSkipResNetForImageClassification(RSkipResNetPreTrainedModel):
    """The network with its classifier of `config.num_labels` classes; returns the loss when `labels` are given."""

    def __init__(self, config: RSkipResNetConfig):
        super().__init__(config)
        if config.num_labels < 1:
            raise ValueError(
                f"num_labels={config.num_labels}: the classifier needs at least 1 class; "
                "use RSkipResNetModel for features without a classifier"
            )
        self.timm_model = _create_timm_model(config, num_classes=config.num_labels)
        self.post_init()

    def forward(
            self,
            pixel_values: torch.Tensor,
            labels: torch.LongTensor | None = None,
            output_hidden_states: bool | None = None,
            return_dict: bool | None = None,
    ) -> ImageClassifierOutputWithNoAttention | tuple[torch.Tensor, ...]:
        last_hidden_state, hidden_states = self._features(pixel_values, output_hidden_states)
        logits = self.timm_model.forward_head(last_hidden_state)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None

        if not (return_dict if return_dict is not None else self.config.return_dict):
            return tuple(value for value in (loss, logits, hidden_states) if value is not None)
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=hidden_states)


__all__ = ["RSkipResNetPreTrainedModel", "RSkipResNetModel", "RSkipResNetForImageClassification"]
