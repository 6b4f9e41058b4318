"""rskip.training as a library, and SkipOptions as the one source of the skip options."""

import argparse
import ast
import dataclasses
import shutil
import warnings

import evaluate
import pytest
from sacrebleu.metrics import BLEU, CHRF

from rskip.commands import train_image_classification
from conftest import REPO
from image_helpers import cifar_parquet, tiny_args  # noqa: F401  (fixture)
from rskip import ConfigFieldError, ResNetSkipOptions, RSkipMarianConfig, RSkipResNetConfig, SkipOptions
from rskip.training.cli import (
    add_skip_arguments,
    check_skip_arguments,
    parse_image_classification_args,
    parse_translation_args,
)
from rskip.training.translation import TRANSLATION_METRIC

TRANSLATION_FLAGS = ["--train_file", "x", "--validation_file", "y", "--source_lang", "en", "--target_lang", "de",
                     "--model_preset", "transformer-tiny", "--output_dir", "out"]


def test_task_pieces_import_from_the_library_in_a_fresh_process(run_python):
    run_python("""
from rskip.training import TrainingConfig, TrainingTask, train
from rskip.training.translation import LengthBatchSampler, TranslationTask, build_model, evaluate, load_raw_datasets
from rskip.training.image_classification import (EpochShuffle, ImageClassificationDataset, ImageClassificationTask,
                                                 build_model, build_transforms, evaluate)
from rskip.training.checkpoints import RunState, find_checkpoint, save_checkpoint
assert issubclass(TranslationTask, TrainingTask) and issubclass(ImageClassificationTask, TrainingTask)
assert list(LengthBatchSampler([3, 3, 5, 5], max_tokens=10, seed=0)) and len(EpochShuffle(4, seed=0)) == 4
""")


def test_training_commands_are_thin_and_scripts_are_shims():
    for name in ("train_translation", "train_image_classification"):
        module = ast.parse((REPO / "modeling" / "commands" / f"{name}.py").read_text())
        docstring, *imports, main, run, entry_point = module.body
        assert all(isinstance(statement, ast.ImportFrom) for statement in imports) and len(imports) == 3
        assert isinstance(main, ast.FunctionDef) and main.name == "main" and len(main.body) == 2
        assert isinstance(run, ast.FunctionDef) and run.name == "run"
        assert isinstance(entry_point, ast.If)
    for script in (REPO / "scripts").glob("*.py"):
        if script.stem in ("demo", "trainer_translation", "trainer_image_classification"):
            continue  # the demo and the Trainer examples are programs of their own, not installed commands
        docstring, import_run, entry_point = ast.parse(script.read_text()).body
        assert import_run.module == f"rskip.commands.{script.stem}", script


def test_the_resnet_config_imports_neither_timm_nor_the_model_code(tmp_path, run_python):
    # As a Hub folder holds them: the two files side by side in a package of their own.
    package = tmp_path / "hub_folder"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("configuration_rskip_resnet.py", "skip_options.py", "library_versions.py"):
        shutil.copy(REPO / "modeling" / name, package / name)
    run_python(f"""
import sys
sys.modules["timm"] = None  # importing timm fails from here on
sys.path.insert(0, {str(tmp_path)!r})
from hub_folder.configuration_rskip_resnet import RSkipResNetConfig
config = RSkipResNetConfig(backbone="preact_resnet20", skip_variant="rskip_ln", skip_recursions=3)
assert config.skip_options().skip_recursions == 3
assert sys.modules["timm"] is None
assert not [name for name in sys.modules if name.startswith("timm.") or "timm_resnets" in name or name.startswith("rskip")]
""")


@pytest.mark.parametrize("config_class, options_class", [(RSkipMarianConfig, SkipOptions),
                                                         (RSkipResNetConfig, ResNetSkipOptions)])
def test_configs_take_their_skip_fields_and_docs_from_skip_options(config_class, options_class):
    config_fields = {spec.name: spec.default for spec in dataclasses.fields(config_class)}
    for spec in dataclasses.fields(options_class):
        assert config_fields[spec.name] == spec.default
        assert f"{spec.name} (`{spec.type.__name__}`, *optional*, defaults to `{spec.default!r}`):" in \
            config_class.__doc__
        assert spec.metadata["help"] in " ".join(config_class.__doc__.split())
    assert "{skip_options}" not in config_class.__doc__


@pytest.mark.parametrize("parse, options_class, base", [(parse_translation_args, SkipOptions, TRANSLATION_FLAGS),
                                                        (parse_image_classification_args, ResNetSkipOptions,
                                                         ["--train_file", "x", "--output_dir", "out"])])
def test_every_skip_option_has_a_flag(parse, options_class, base):
    given = {"skip_variant": "rskip_ln", "skip_recursions": 3, "skip_share_norm": True}
    args = parse([*base, "--skip_variant", "rskip_ln", "--skip_recursions", "3", "--skip_share_norm"])
    assert options_class.given(args) == given
    parser = argparse.ArgumentParser()
    add_skip_arguments(parser, options_class, default="rskip_ln")
    assert {action.dest for action in parser._actions} - {"help"} == {spec.name for spec in
                                                                      dataclasses.fields(options_class)}


def test_a_bad_option_is_mapped_to_its_flag_by_field_not_by_wording(capsys):
    @dataclasses.dataclass(frozen=True)
    class Reworded(SkipOptions):
        def __post_init__(self):
            if self.skip_recursions > 2:
                raise ConfigFieldError("skip_recursions", self.skip_recursions, "1 or 2", "-- a reworded message")

    parser = argparse.ArgumentParser()
    add_skip_arguments(parser, Reworded, default="rskip_ln")
    with pytest.raises(SystemExit):
        check_skip_arguments(parser, parser.parse_args(["--skip_recursions", "5"]), Reworded)
    assert "argument --skip_recursions: skip_recursions=5 -- a reworded message; allowed: 1 or 2" in \
        capsys.readouterr().err


def test_config_field_errors_carry_field_value_and_allowed():
    with pytest.raises(ConfigFieldError) as error:
        RSkipMarianConfig(skip_variant="xskip", skip_scale=-2.0)
    assert (error.value.field, error.value.value, error.value.allowed) == ("skip_scale", -2.0, "a number > 0")
    assert isinstance(error.value, ValueError)


def test_summaries_and_labels_name_only_the_options_a_variant_uses():
    assert SkipOptions(skip_variant="post_ln").used() == {"skip_variant": "post_ln"}
    assert SkipOptions(skip_variant="post_ln").label() == "post_ln"
    assert SkipOptions(skip_variant="rskip_ln", skip_recursions=3).label() == "rskip_ln K=3"
    assert SkipOptions(skip_variant="xskip", skip_scale=0.5, skip_learnable_scale=True).label() == \
        "xskip λ=0.5 learned λ"
    assert ResNetSkipOptions(skip_variant="rskip_ln", skip_norm_dims="c").label() == "rskip_ln K=2 LN over c"
    assert ResNetSkipOptions(skip_variant="rskip_bn").used() == {"skip_variant": "rskip_bn", "skip_recursions": 2,
                                                                 "skip_share_norm": False}
    name, equation = SkipOptions(skip_variant="rskip_ln", skip_recursions=3).describe()
    assert "K = 3" in name and equation.startswith("y_K")


def test_the_translation_metric_loads_offline_through_evaluate_and_matches_sacrebleu(monkeypatch):
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    predictions = ["Ein Mann fährt ein Fahrrad.", "Zwei Hunde spielen im Schnee."]
    references = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee."]
    scores = evaluate.load(TRANSLATION_METRIC).compute(predictions=predictions, references=references,
                                                       bleu_tokenize="char")
    bleu, chrf = BLEU(tokenize="char"), CHRF()
    assert scores == {
        "bleu": round(bleu.corpus_score(predictions, [references]).score, 2),
        "chrf": round(chrf.corpus_score(predictions, [references]).score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }
    assert "tok:char" in scores["bleu_signature"]


def test_a_warmup_longer_than_the_run_warns_at_the_start(cifar_parquet, tmp_path, capsys):  # noqa: F811
    with pytest.warns(UserWarning, match="num_warmup_steps=10 exceeds the 2 updates of this run"):
        results = train_image_classification.main(tiny_args(cifar_parquet, tmp_path / "run", "--skip_variant",
                                                            "post_ln", "--max_train_steps", "2",
                                                            "--num_warmup_steps", "10"))
    summary = capsys.readouterr().out
    assert "skip connection {'skip_variant': 'post_ln', 'skip_norm_dims': 'chw'}" in summary
    assert [record["epoch"] for record in results["history"]] == [round(2 / 3, 2)]


def test_a_warmup_within_the_run_does_not_warn(cifar_parquet, tmp_path):  # noqa: F811
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="num_warmup_steps")
        train_image_classification.main(tiny_args(cifar_parquet, tmp_path / "run", "--max_train_steps", "2",
                                                  "--num_warmup_steps", "1"))


def test_checkpoints_do_not_depend_on_the_hub():
    """The Hub code uploads and downloads checkpoints; the checkpoint code knows nothing of the Hub."""
    tree = ast.parse((REPO / "modeling" / "training" / "checkpoints.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "hub" not in imported and "rskip.training.hub" not in imported
