"""transformers' own model tests on rskip's translation models: `ModelTesterMixin` from `tests/test_modeling_common.py`
of the installed transformers version's sdist (fetched once with pip into .cache/), driven by our tester, on
`RSkipMarianModel` and `RSkipMarianMTModel` at `post_ln` (Marian itself) and at rSkip+LN with K = 2.

The sdist ships `test_modeling_common.py` but not two modules it imports for other mixins: `ExportTesterMixin`
(`tests/exporters/`, the mixin's base class, which adds the torch.export tests) and `GenerationTesterMixin`
(`tests/generation/`, only named there in one `issubclass` check). Both stand in here as empty classes, so no export
or generation test runs (generation is tested in test_marian.py). The mixin decides some tests by class name, looked
up in transformers' own auto mappings: our classes are listed there beside Marian's while this module runs. The tests
that do not apply are not collected; `NOT_APPLICABLE` gives each one's reason, as the README's table does.
"""

import importlib
import subprocess
import sys
import tarfile
import types
import unittest
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
from transformers.models.auto import modeling_auto

from conftest import REPO
from rskip import RSkipMarianConfig, RSkipMarianModel, RSkipMarianMTModel

CACHE = REPO / ".cache"
VERSION = transformers.__version__

# The ModelTesterMixin tests that are not run, by reason. A name also covers its parameterized expansions (`_0_fp16`).
NOT_APPLICABLE = {
    "need a GPU, several GPUs or Apple MPS": (
        "test_model_parallelism", "test_cpu_offload", "test_disk_offload_bin", "test_disk_offload_safetensors",
        "test_can_load_with_device_context_manager", "test_can_load_with_global_device_set",
        "test_sdpa_can_dispatch_on_flash", "test_sdpa_can_compile_dynamic", "test_torch_compile_for_training",
        "test_flex_attention_with_grads", "test_flash_attn_kernels_mps_inference_equivalence",
    ),
    "need flash-attn 2/3/4, the kernels library or DeepSpeed (with a GPU), none of them a dependency": (
        "test_flash_attn_2_inference_equivalence", "test_flash_attn_2_inference_equivalence_right_padding",
        "test_flash_attn_2_can_dispatch_composite_models", "test_flash_attn_2_fp32_ln", "test_flash_attn_2_from_config",
        "test_flash_attn_2_can_compile_with_attention_mask_None_without_graph_break",
        "test_flash_attn_3_inference_equivalence", "test_flash_attn_3_inference_equivalence_right_padding",
        "test_flash_attn_3_can_dispatch_composite_models", "test_flash_attn_3_from_config",
        "test_flash_attn_4_inference_equivalence", "test_flash_attn_4_inference_equivalence_right_padding",
        "test_flash_attn_4_can_dispatch_composite_models", "test_flash_attn_4_from_config",
        "test_flash_attn_kernels_inference_equivalence", "test_kernels_can_load_without_crashing",
        "test_resize_tokens_embeddings_with_deepspeed", "test_resize_tokens_embeddings_with_deepspeed_multi_gpu",
        "test_resize_embeddings_untied_with_deepspeed", "test_resize_embeddings_untied_with_deepspeed_multi_gpu",
    ),
    "composite and multimodal models only (Marian has no sub-configs, no vision, audio or video tower)": (
        "test_attn_implementation_composite_models", "test_can_set_attention_dynamically_composite_model",
        "test_sdpa_can_dispatch_composite_models", "test_internal_model_config_and_subconfig_are_same",
        "test_multimodal_outputs_are_returned", "test_get_text_features_output", "test_get_text_features_hidden_states",
        "test_get_text_features_attentions", "test_get_image_features_output", "test_get_image_features_pooler_output",
        "test_get_image_features_hidden_states", "test_get_image_features_attentions", "test_get_audio_features_output",
        "test_get_audio_features_hidden_states", "test_get_audio_features_attentions", "test_get_video_features_output",
        "test_get_video_features_pooler_output", "test_get_video_features_hidden_states",
        "test_get_video_features_attentions",
    ),
    "features Marian does not have: RoPE, mixture of experts, sliding-window attention, a tensor-parallel plan, "
    "learned position embeddings to resize (Marian's are sinusoidal), modules kept in fp32": (
        "test_model_rope_scaling_from_config", "test_model_rope_scaling_frequencies", "test_model_rope_with_partial_rotation",
        "test_vision_axial_rope", "test_moe_models_record_router_logits", "test_output_router_logits_from_config",
        "test_eager_matches_batched_and_grouped_inference", "test_sliding_window_mask", "test_tp_plan_matches_params",
        "test_resize_position_vector_embeddings", "test_keep_in_fp32_modules", "test_keep_in_fp32_modules_exist",
        "test_keep_in_fp32_modules_strict_also_hardcode_fp32",
    ),
    "heads these models do not have: decoder-only causal LM, sequence or image classification": (
        "test_causal_lm_loss_honors_shift_labels", "test_problem_types", "test_load_with_mismatched_shapes",
        "test_can_load_ignoring_mismatched_shapes",
    ),
    "checkpoint key conversions, which transformers defines for some models and not for Marian": (
        "test_reverse_loading_mapping", "test_can_load_from_already_mapped_keys",
    ),
    "capture of hidden states by layer index reads `hidden_states`; a seq2seq output names them "
    "`encoder_hidden_states` and `decoder_hidden_states` (test_hidden_states_output covers them)": (
        "test_can_capture_specific_layers_hidden_states",
    ),
    "checks for `GenerationTesterMixin` (tests/generation/, not in the sdist); test_marian.py tests `generate`": (
        "test_generation_tester_mixin_inheritance",
    ),
}


def unpacked_sdist_tests() -> Path:
    """The `tests/` folder of the installed transformers version's sdist, downloaded into .cache/ on first use."""
    tests = CACHE / f"transformers-{VERSION}" / "tests"
    if not (tests / "test_modeling_common.py").exists():
        command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
                   f"transformers=={VERSION}", "--dest", str(CACHE)]
        result = subprocess.run(command, capture_output=True, text=True)
        archive = CACHE / f"transformers-{VERSION}.tar.gz"
        if result.returncode != 0 or not archive.exists():
            raise RuntimeError(f"could not fetch transformers {VERSION}'s tests, which ship only in its sdist: "
                               f"`{' '.join(command)}` needs PyPI.\n{result.stderr}")
        with tarfile.open(archive) as sdist:
            members = [member for member in sdist.getmembers()
                       if member.name.startswith(f"transformers-{VERSION}/tests/")]
            sdist.extractall(CACHE, members=members, filter="data")
    return tests


def import_test_modeling_common() -> types.ModuleType:
    """`test_modeling_common` of the sdist, imported as `transformers_sdist_tests.test_modeling_common` with empty
    stand-ins for the two mixins it imports from modules the sdist lacks."""
    package = types.ModuleType("transformers_sdist_tests")
    package.__path__ = [str(unpacked_sdist_tests())]
    sys.modules[package.__name__] = package
    for folder, module, mixin in (("exporters", "test_export", "ExportTesterMixin"),
                                  ("generation", "test_utils", "GenerationTesterMixin")):
        subpackage = types.ModuleType(f"{package.__name__}.{folder}")
        subpackage.__path__ = []
        stand_in = types.ModuleType(f"{subpackage.__name__}.{module}")
        setattr(stand_in, mixin, type(mixin, (), {"__doc__": "Not in the sdist: an empty stand-in."}))
        sys.modules.update({subpackage.__name__: subpackage, stand_in.__name__: stand_in})
    with warnings.catch_warnings():  # the marks of transformers' own pytest configuration, which is not loaded here
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        return importlib.import_module(f"{package.__name__}.test_modeling_common")


test_modeling_common = import_test_modeling_common()


def is_listed(test_name: str, listed_name: str) -> bool:
    """Whether `test_name` is `listed_name` or one of its parameterized expansions (`<name>_<index>[_<label>]`)."""
    suffix = test_name.removeprefix(listed_name)
    return suffix == "" or (suffix != test_name and suffix[:1] == "_" and suffix[1:2].isdigit())


@pytest.fixture(autouse=True, scope="module")
def rskip_classes_beside_marians_in_the_auto_mappings():
    """The mixin gives labels, and trains, only classes it finds by name in transformers' auto mappings."""
    mappings = [names for name, names in vars(modeling_auto).items()
                if name.endswith("_MAPPING_NAMES") and isinstance(names, dict)]
    rskip_names = {"MarianModel": RSkipMarianModel.__name__, "MarianMTModel": RSkipMarianMTModel.__name__}
    patches = [mock.patch.dict(names, {RSkipMarianConfig.model_type: rskip_names[names["marian"]]})
               for names in mappings if names.get("marian") in rskip_names]
    assert len(patches) >= 2, "transformers no longer lists MarianModel and MarianMTModel by name"
    for patch in patches:
        patch.start()
    yield
    for patch in patches:
        patch.stop()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Hundreds of tiny models: one thread does the work of two on 2 cores at half the CPU time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RSkipMarianModelTester:
    """The model tester that `ModelTesterMixin` drives: a tiny config (a few kB of weights) and inputs for it."""

    def __init__(self, parent: unittest.TestCase, skip_options: dict):
        self.parent = parent
        self.skip_options = skip_options
        self.batch_size = 4
        self.seq_length = 7
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 16
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.intermediate_size = 8
        self.bos_token_id, self.pad_token_id, self.eos_token_id, self.decoder_start_token_id = 0, 1, 2, 3

    def get_config(self) -> RSkipMarianConfig:
        return RSkipMarianConfig(
            vocab_size=self.vocab_size, d_model=self.hidden_size, encoder_layers=self.num_hidden_layers,
            decoder_layers=self.num_hidden_layers, encoder_attention_heads=self.num_attention_heads,
            decoder_attention_heads=self.num_attention_heads, encoder_ffn_dim=self.intermediate_size,
            decoder_ffn_dim=self.intermediate_size, dropout=0.1, attention_dropout=0.1, max_position_embeddings=64,
            bos_token_id=self.bos_token_id, pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
            decoder_start_token_id=self.decoder_start_token_id, **self.skip_options)

    def prepare_config_and_inputs(self) -> tuple[RSkipMarianConfig, dict]:
        ids_tensor = test_modeling_common.ids_tensor
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size).clamp(min=3)
        input_ids[:, -1] = self.eos_token_id
        decoder_input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        return self.get_config(), dict(
            input_ids=input_ids, attention_mask=input_ids.ne(self.pad_token_id), decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_input_ids.ne(self.pad_token_id))

    def prepare_config_and_inputs_for_common(self) -> tuple[RSkipMarianConfig, dict]:
        return self.prepare_config_and_inputs()


class RSkipMarianConformance(test_modeling_common.ModelTesterMixin):
    all_model_classes = (RSkipMarianModel, RSkipMarianMTModel)
    is_encoder_decoder = True
    # Run the check of `_init_weights` that the mixin keeps, by default, to models written since 2023.
    test_can_init_all_missing_weights_before_2023 = True
    skip_options: dict = {}

    def setUp(self):
        self.model_tester = RSkipMarianModelTester(self, self.skip_options)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in dir(cls):  # not collected: a None attribute is no test
            if any(is_listed(name, listed) for names in NOT_APPLICABLE.values() for listed in names):
                setattr(cls, name, None)


class RSkipMarianPostLNTest(RSkipMarianConformance, unittest.TestCase):
    skip_options = {"skip_variant": "post_ln"}


class RSkipMarianRSkipLNTest(RSkipMarianConformance, unittest.TestCase):
    skip_options = {"skip_variant": "rskip_ln", "skip_recursions": 2}


def test_every_test_listed_as_not_applicable_is_a_model_tester_test():
    mixin_tests = [name for name in dir(test_modeling_common.ModelTesterMixin) if name.startswith("test_")]
    stale = [listed for names in NOT_APPLICABLE.values() for listed in names
             if not any(is_listed(name, listed) for name in mixin_tests)]
    assert not stale, f"no longer in transformers {VERSION}'s ModelTesterMixin: {stale}"


def test_the_readme_lists_the_tests_that_do_not_apply():
    readme = (REPO / "README.md").read_text()
    for reason, names in NOT_APPLICABLE.items():
        assert f"| {', '.join(f'`{name}`' for name in names)} | {reason} |" in readme, reason
