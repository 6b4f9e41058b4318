"""RSkipResNet model configuration."""

from transformers import PreTrainedConfig

from .timm_resnets import BACKBONES, ResNetSkipOptions


class RSkipResNetConfig(PreTrainedConfig):
    r"""
    Configuration of a timm ResNet whose blocks join shortcut and branch with the residual family of Liu et al.
    (COLING 2020). `num_labels` (from [`PreTrainedConfig`]) sizes the classifier.

    backbone (`str`, *optional*, defaults to `"preact_resnet110"`):
        The timm model: `preact_resnet20`, `preact_resnet56`, `preact_resnet110`, `preact_resnet164` (CIFAR,
        32×32 inputs) or `rskip_resnet18`, `rskip_resnet34`, `rskip_resnet50`, `rskip_resnet101`, `rskip_resnet152`.
    skip_variant (`str`, *optional*, defaults to `"rskip_ln"`):
        One of `plain`, `post_ln`, `pre_ln`, `xskip`, `xskip_ln`, `rskip_ln`, `xskip_bn`, `rskip_bn`.
        `plain` is the stock ResNet.
    skip_scale (`float`, *optional*, defaults to 1.0):
        λ of the `xskip*` variants, multiplying the block's shortcut before the add; must be > 0.
    skip_recursions (`int`, *optional*, defaults to 2):
        K of the `rskip*` variants: y_k = LN_k(s + y_{k-1}), k = 1..K. K = 1 is `post_ln`.
    skip_share_norm (`bool`, *optional*, defaults to `False`):
        `rskip*` only: one norm for all K steps instead of one per step.
    skip_learnable_scale (`bool`, *optional*, defaults to `False`):
        `xskip*` only: learn λ (one scalar per block, initialised at `skip_scale`).
    skip_norm_dims (`str`, *optional*, defaults to `"chw"`):
        LN variants only: normalise each sample over (C, H, W) with a per-channel affine (`"chw"`) or each
        position over C (`"c"`).
    in_chans (`int`, *optional*, defaults to 3):
        Number of image channels.
    drop_rate (`float`, *optional*, defaults to 0.0):
        Dropout before the classifier.
    drop_path_rate (`float`, *optional*, defaults to 0.0):
        Stochastic depth rate, rising linearly over the blocks.

    An option the chosen variant does not use must keep its default; otherwise a `ValueError` says which option is
    set and which variants use it.

    Example:

    ```python
    >>> from rskip import RSkipResNetConfig, RSkipResNetForImageClassification

    >>> config = RSkipResNetConfig(backbone="preact_resnet56", num_labels=10, skip_variant="rskip_ln")
    >>> model = RSkipResNetForImageClassification(config)
    ```"""

    model_type = "rskip_resnet"

    backbone: str = "preact_resnet110"
    skip_variant: str = "rskip_ln"
    skip_scale: float | int = 1.0
    skip_recursions: int = 2
    skip_share_norm: bool = False
    skip_learnable_scale: bool = False
    skip_norm_dims: str = "chw"
    in_chans: int = 3
    drop_rate: float | int = 0.0
    drop_path_rate: float | int = 0.0

    def __post_init__(self, **kwargs):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone={self.backbone!r} is not an rskip timm model; allowed: {', '.join(BACKBONES)}")
        if isinstance(self.in_chans, bool) or not isinstance(self.in_chans, int) or self.in_chans < 1:
            raise ValueError(f"in_chans={self.in_chans!r} must be an integer >= 1 (the number of image channels)")
        self.skip_options()
        super().__post_init__(**kwargs)

    def skip_options(self) -> ResNetSkipOptions:
        """The validated `skip_*` fields."""
        return ResNetSkipOptions.from_object(self)


__all__ = ["RSkipResNetConfig"]
