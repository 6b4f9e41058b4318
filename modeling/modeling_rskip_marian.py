"""Marian with the residual family of Liu et al., "Rethinking Skip Connection with Layer
Normalization in Transformers and ResNets" (COLING 2020, arXiv:2105.07205).

Every residual sublayer (encoder self-attention and FFN; decoder self-attention, cross-attention
and FFN) joins its input x and its dropped-out output h with the configured skip connection, e.g.
rSkip+LN with K = 2: y = LN_2(x + LN_1(x + h)). The skip module sits where Marian's post-add
LayerNorm was, under the same name, and is itself LN_1, so Marian checkpoints load unchanged and
`post_ln` is Marian.
"""

from contextlib import contextmanager

import torch
from torch import nn
from transformers import initialization as init
from transformers.models.marian.modeling_marian import (
    MarianDecoder,
    MarianDecoderLayer,
    MarianEncoder,
    MarianEncoderLayer,
    MarianModel,
    MarianMTModel,
    MarianPreTrainedModel,
)

from .configuration_rskip_marian import RSkipMarianConfig
from .residual import NormSkip, ScaledSkip, create_skip
from .weights_files import WeightsFileCheckMixin

# transformers < 5.10 copies into a saved folder's module cache only the files that the loaded file itself imports:
# these are the rest of what this file needs (through the files above).
from .fused_skip import skip_norm  # noqa: F401
from .fused_skip_triton import supports  # noqa: F401  (imported by `fused_skip` in a form the copy does not follow)
from .library_versions import require_versions  # noqa: F401
from .pipeline_translation import TranslationPipeline  # noqa: F401
from .skip_options import SkipOptions  # noqa: F401


class SequenceBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the feature axis of (batch, length, features) tensors.

    Statistics are taken over every position, padding included (the `*_bn` variants are the
    paper's ablation, not a recommended Transformer setting).
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states.reshape(-1, hidden_states.shape[-1])).view_as(hidden_states)


def create_sublayer_skip(config: RSkipMarianConfig) -> nn.Module:
    return create_skip(config.skip_options(), config.d_model, ln_layer=nn.LayerNorm, bn_layer=SequenceBatchNorm)


class RSkipMarianEncoderLayer(MarianEncoderLayer):
    """Identical to [`MarianEncoderLayer`] except: `self_attn_layer_norm` and `final_layer_norm` are
    skip connections, called as `skip(residual, hidden_states)` after each sublayer."""

    def __init__(self, config: RSkipMarianConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx)
        self.self_attn_layer_norm = create_sublayer_skip(config)
        self.final_layer_norm = create_sublayer_skip(config)

    def forward(self, hidden_states, attention_mask, **kwargs):
        # Self Attention
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.self_attn_layer_norm.branch_input(hidden_states),
            attention_mask=attention_mask,
            **kwargs,
        )
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.self_attn_layer_norm(residual, hidden_states)

        # Fully Connected
        residual = hidden_states
        hidden_states = self.activation_fn(self.fc1(self.final_layer_norm.branch_input(hidden_states)))
        hidden_states = nn.functional.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        hidden_states = self.fc2(hidden_states)
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.final_layer_norm(residual, hidden_states)

        if hidden_states.dtype == torch.float16 and not torch.isfinite(hidden_states).all():
            clamp_value = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)

        return hidden_states


class RSkipMarianDecoderLayer(MarianDecoderLayer):
    """Identical to [`MarianDecoderLayer`] except: `self_attn_layer_norm`, `encoder_attn_layer_norm`
    and `final_layer_norm` are skip connections, called as `skip(residual, hidden_states)`."""

    def __init__(self, config: RSkipMarianConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx)
        self.self_attn_layer_norm = create_sublayer_skip(config)
        self.encoder_attn_layer_norm = create_sublayer_skip(config)
        self.final_layer_norm = create_sublayer_skip(config)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        cache=None,
        use_cache=True,
        **kwargs,
    ):
        # Self Attention
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.self_attn_layer_norm.branch_input(hidden_states),
            cache=cache,
            attention_mask=attention_mask,
            **kwargs,
        )
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.self_attn_layer_norm(residual, hidden_states)

        # Cross-Attention Block
        if encoder_hidden_states is not None:
            residual = hidden_states
            hidden_states, _ = self.encoder_attn(
                self.encoder_attn_layer_norm.branch_input(hidden_states),
                key_value_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                cache=cache,
                **kwargs,
            )
            hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
            hidden_states = self.encoder_attn_layer_norm(residual, hidden_states)

        # Fully Connected
        residual = hidden_states
        hidden_states = self.activation_fn(self.fc1(self.final_layer_norm.branch_input(hidden_states)))
        hidden_states = nn.functional.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        hidden_states = self.fc2(hidden_states)
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.final_layer_norm(residual, hidden_states)

        return hidden_states


@contextmanager
def legacy_checkpointing_deferred(config: RSkipMarianConfig):
    """Hold back the legacy `config.gradient_checkpointing` switch while the stock constructors run.

    `post_init` of the first (stock Marian) module built would enable checkpointing on itself and delete the switch,
    and that module is then replaced by ours: the model would train without checkpointing. The switch is put back on
    leaving, for the caller's own `post_init`, which enables checkpointing on the whole finished model.
    """
    legacy_switch = config.__dict__.pop("gradient_checkpointing", None)
    try:
        yield
    finally:
        if legacy_switch is not None:
            config.gradient_checkpointing = legacy_switch


class RSkipMarianPreTrainedModel(WeightsFileCheckMixin, MarianPreTrainedModel):
    config: RSkipMarianConfig
    config_class = RSkipMarianConfig
    _no_split_modules = ["RSkipMarianEncoderLayer", "RSkipMarianDecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (ScaledSkip, NormSkip)) and isinstance(module.scale, nn.Parameter):
            init.constant_(module.scale, module.initial_scale)


class RSkipMarianEncoder(RSkipMarianPreTrainedModel, MarianEncoder):
    """[`MarianEncoder`] made of [`RSkipMarianEncoderLayer`]s."""

    def __init__(self, config: RSkipMarianConfig):
        with legacy_checkpointing_deferred(config):
            super().__init__(config)
            self.layers = nn.ModuleList([RSkipMarianEncoderLayer(config) for _ in range(config.encoder_layers)])
        self.post_init()


class RSkipMarianDecoder(RSkipMarianPreTrainedModel, MarianDecoder):
    """[`MarianDecoder`] made of [`RSkipMarianDecoderLayer`]s."""

    def __init__(self, config: RSkipMarianConfig):
        with legacy_checkpointing_deferred(config):
            super().__init__(config)
            self.layers = nn.ModuleList(
                [RSkipMarianDecoderLayer(config, layer_idx=i) for i in range(config.decoder_layers)]
            )
        self.post_init()


class _FinalLayerNorm:
    """`pre_ln` stacks end with a LayerNorm (`layer_norm`, as in mBART), applied to the last hidden state."""

    def __init__(self, config: RSkipMarianConfig):
        with legacy_checkpointing_deferred(config):
            super().__init__(config)
            self.layer_norm = nn.LayerNorm(config.d_model)
        self.post_init()

    def forward(self, *args, **kwargs):
        outputs = super().forward(*args, **kwargs)
        last_hidden_state = self.layer_norm(outputs[0])
        if isinstance(outputs, tuple):
            return (last_hidden_state, *outputs[1:])
        outputs.last_hidden_state = last_hidden_state
        if outputs.hidden_states is not None:
            outputs.hidden_states = (*outputs.hidden_states[:-1], last_hidden_state)
        return outputs


class RSkipMarianPreLNEncoder(_FinalLayerNorm, RSkipMarianEncoder):
    pass


class RSkipMarianPreLNDecoder(_FinalLayerNorm, RSkipMarianDecoder):
    pass


class RSkipMarianModel(RSkipMarianPreTrainedModel, MarianModel):
    """[`MarianModel`] whose encoder and decoder use the configured skip connection."""

    def __init__(self, config: RSkipMarianConfig):
        with legacy_checkpointing_deferred(config):
            super().__init__(config)
            pre_ln = config.skip_options().skip_variant == "pre_ln"
            self.encoder = (RSkipMarianPreLNEncoder if pre_ln else RSkipMarianEncoder)(config)
            self.decoder = (RSkipMarianPreLNDecoder if pre_ln else RSkipMarianDecoder)(config)
        self.post_init()


class RSkipMarianMTModel(RSkipMarianPreTrainedModel, MarianMTModel):
    """[`MarianMTModel`] whose encoder and decoder use the configured skip connection.

    `RSkipMarianMTModel.from_pretrained(marian_checkpoint, skip_variant=..., ...)` patches a stock
    Marian checkpoint: every Marian weight loads by name; only norms Marian lacks (the recursion
    norms LN_2..LN_K, a `pre_ln` stack's final norm) and learnable scales start fresh, the norms
    as the identity.
    """

    # Marian's forward takes **kwargs but its loss ignores `num_items_in_batch`: without this,
    # Trainer would skip dividing the loss by the gradient-accumulation steps.
    accepts_loss_kwargs = False

    def __init__(self, config: RSkipMarianConfig):
        with legacy_checkpointing_deferred(config):
            super().__init__(config)
            self.model = RSkipMarianModel(config)
        self.post_init()


__all__ = [
    "RSkipMarianPreTrainedModel",
    "RSkipMarianModel",
    "RSkipMarianMTModel",
]
