"""pytest plugin (`-p rskip_timm_plugin`) that lets timm's own `tests/test_models.py` test rskip's models.

Importing rskip registers them with timm before timm's test module collects `list_models()`. timm's tests build
each model by name with default arguments (rSkip+LN, K = 2), so other skip variants get names of their own here.
"""

import rskip  # noqa: F401  (registers preact_resnet* and rskip_resnet* with timm)
from timm.models import generate_default_cfgs, get_pretrained_cfg, model_entrypoint, register_model

VARIANT_MODELS = {
    "preact_resnet20_plain": ("preact_resnet20", dict(skip_variant="plain")),
    "preact_resnet20_xskip_learned": ("preact_resnet20", dict(skip_variant="xskip", skip_scale=0.5,
                                                              skip_learnable_scale=True)),
    "preact_resnet20_pre_ln": ("preact_resnet20", dict(skip_variant="pre_ln")),
    "preact_resnet20_rskip_ln_shared_c": ("preact_resnet20", dict(skip_recursions=3, skip_share_norm=True,
                                                                  skip_norm_dims="c")),
    "preact_resnet20_xskip_bn": ("preact_resnet20", dict(skip_variant="xskip_bn", skip_scale=2.0)),
    "rskip_resnet18_rskip_bn": ("rskip_resnet18", dict(skip_variant="rskip_bn")),
}

default_cfgs = generate_default_cfgs({name: get_pretrained_cfg(base) for name, (base, _) in VARIANT_MODELS.items()})


def _register_variant(name: str, base: str, skip_args: dict) -> None:
    def entrypoint(pretrained: bool = False, **kwargs):
        return model_entrypoint(base)(pretrained, **dict(skip_args, **kwargs))

    entrypoint.__name__ = entrypoint.__qualname__ = name
    register_model(entrypoint)


for _name, (_base, _skip_args) in VARIANT_MODELS.items():
    _register_variant(_name, _base, _skip_args)
