"""RSkipResNet model configuration."""

from .library_versions import require_versions, tested_ranges

# First: with older libraries the imports and classes below would fail deep inside them (the model code needs timm).
require_versions("transformers", "timm")

from transformers import PreTrainedConfig  # noqa: E402

from .skip_options import (  # noqa: E402
    ConfigFieldError,
    ResNetSkipOptions,
    check_number,
    holds_numbers,
    plain_int,
    with_skip_docs,
)

# The timm models of `timm_resnets`: CIFAR pre-activation ResNets, and timm's ImageNet ResNets with the skip options.
CIFAR_BACKBONES = ("preact_resnet20", "preact_resnet56", "preact_resnet110", "preact_resnet164")
IMAGENET_BACKBONES = ("rskip_resnet18", "rskip_resnet34", "rskip_resnet50", "rskip_resnet101", "rskip_resnet152")
BACKBONES = CIFAR_BACKBONES + IMAGENET_BACKBONES


@with_skip_docs(ResNetSkipOptions)
class RSkipResNetConfig(PreTrainedConfig, ResNetSkipOptions.config_fields()):
    r"""
    Configuration of a timm ResNet whose blocks join shortcut and branch with the residual family of Liu et al.
    (COLING 2020). `num_labels` (from [`PreTrainedConfig`]) sizes the classifier. In a block, x of the equations
    below is the block's shortcut (the identity or its projection); `plain` is the stock ResNet.

    backbone (`str`, *optional*, defaults to `"preact_resnet110"`):
        The timm model: `preact_resnet20`, `preact_resnet56`, `preact_resnet110`, `preact_resnet164` (CIFAR,
        32×32 inputs) or `rskip_resnet18`, `rskip_resnet34`, `rskip_resnet50`, `rskip_resnet101`, `rskip_resnet152`.
    {skip_options}
    in_chans (`int`, *optional*, defaults to 3):
        Number of image channels.
    drop_rate (`float`, *optional*, defaults to 0.0):
        Dropout before the classifier, in [0, 1].
    drop_path_rate (`float`, *optional*, defaults to 0.0):
        Stochastic depth rate, rising linearly over the blocks, in [0, 1].

    An option the chosen variant does not use must keep its default. Integral numbers (numpy integers, say) are taken
    where an `int` is, and stored as plain `int`s. A bad value, or a keyword that starts with `skip_` but is no skip
    option, raises `ConfigFieldError` (a `ValueError` whose `field`, `value` and `allowed` say what is wrong).

    Example:

    ```python
    >>> from rskip import RSkipResNetConfig, RSkipResNetForImageClassification

    >>> config = RSkipResNetConfig(backbone="preact_resnet56", num_labels=10, skip_variant="rskip_ln")
    >>> model = RSkipResNetForImageClassification(config)
    ```"""

    model_type = "rskip_resnet"

    backbone: str = "preact_resnet110"
    in_chans: int = 3
    drop_rate: float | int = 0.0
    drop_path_rate: float | int = 0.0

    def __post_init__(self, **kwargs):
        ResNetSkipOptions.refuse_unknown(kwargs, type(self).__name__)
        if self.backbone not in BACKBONES:
            raise ConfigFieldError("backbone", self.backbone, ", ".join(BACKBONES), "is not an rskip timm model")
        if isinstance(self.in_chans, bool) or not isinstance(self.in_chans, int) or self.in_chans < 1:
            raise ConfigFieldError("in_chans", self.in_chans, "an integer >= 1 (the number of image channels)",
                                   "is not a channel count")
        check_number("drop_rate", self.drop_rate, 0, 1)
        check_number("drop_path_rate", self.drop_path_rate, 0, 1)
        if "num_labels" in kwargs:  # PreTrainedConfig's, not a field: it builds id2label from range(num_labels)
            kwargs["num_labels"] = plain_int(kwargs["num_labels"])
            check_number("num_labels", kwargs["num_labels"], 0, integer=True)
        self.skip_options()
        super().__post_init__(**kwargs)

    def __setattr__(self, name, value):
        field = self.__dataclass_fields__.get(name)
        if field is not None and holds_numbers(field.type):  # a numpy integer from a grid is an int
            value = plain_int(value)
        super().__setattr__(name, value)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # `from_pretrained(folder, skip_recursion=3)` would drop a keyword that is no attribute without a word.
        ResNetSkipOptions.refuse_unknown(kwargs, cls.__name__)
        return super().from_dict(config_dict, **kwargs)

    def skip_options(self) -> ResNetSkipOptions:
        """The validated `skip_*` fields."""
        return ResNetSkipOptions.from_object(self)

    def to_dict(self) -> dict:
        # config.json tells the folder's users which library versions its code is tested with.
        return {**super().to_dict(), "rskip_compatibility": tested_ranges("transformers", "timm")}


__all__ = ["RSkipResNetConfig"]
