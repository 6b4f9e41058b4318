"""Model cards (README.md) of training runs, from their results.json and config.json.

The card is filled from the template in `card_templates/` (package data) for the run's task (translation or image
classification): Hub metadata (`model-index` with the scores), the residual connection's equation, a usage snippet,
the exact command that produced the run, the scores with their sacreBLEU signatures, and, with a baseline, a table
against another run. Every training run writes one at its end; `rskip-model-card` rewrites one.
"""

import json
import shlex
from importlib.resources import files
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..library_versions import tested_ranges
from ..skip_options import ResNetSkipOptions, SkipOptions

# Package data, so that an installed wheel has them as well as a clone.
TEMPLATES = files(__package__) / "card_templates"
TASKS = {"rskip_marian": "translation", "rskip_resnet": "image_classification"}
# Settings that say where a run writes, uploads and logs, or when it saves a checkpoint: not what it trains.
BOOKKEEPING_SETTINGS = frozenset({
    "output_dir", "hub_model_id", "hub_token", "push_to_hub", "with_tracking", "report_to", "checkpointing_steps",
    "checkpoints_total_limit", "resume_from_checkpoint", "hub_strategy", "overwrite_output_dir",
})


def read_run(folder: Path) -> tuple[dict, dict]:
    """The results.json and config.json of a run's output folder."""
    missing = [name for name in ("results.json", "config.json") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a finished training run's output folder: it has no "
                                f"{' or '.join(missing)}")
    return json.loads((folder / "results.json").read_text()), json.loads((folder / "config.json").read_text())


def skip_options_of(results: dict) -> SkipOptions:
    """The skip options a run recorded in its results.json."""
    skip = results["skip"]
    return (ResNetSkipOptions if "skip_norm_dims" in skip else SkipOptions)(**skip)


def task_of(folder: Path, config: dict) -> str:
    """The run's task, from its config.json's model_type."""
    task = TASKS.get(config.get("model_type"))
    if task is None:
        raise ValueError(f"{folder}/config.json has model_type={config.get('model_type')!r}; "
                         f"model cards are written for {', '.join(TASKS)}")
    return task


def program_of(command: str) -> str:
    """The program a recorded command ran: `rskip-train-translation`, or the script or module Python ran."""
    words = shlex.split(command)
    if Path(words[0]).name.startswith("python") and len(words) > 1:
        return words[2] if words[1] == "-m" and len(words) > 2 else Path(words[1]).name
    return Path(words[0]).name


def setting_differences(results: dict, base_results: dict) -> list[dict]:
    """What differs between two runs' commands besides the skip options: the script, and every recorded setting
    (results.json "args") but the bookkeeping ones. Each entry: the setting, this run's value, the baseline's."""
    scripts = [program_of(run["command"]) for run in (results, base_results)]
    differences = [{"setting": "script", "run": scripts[0], "baseline": scripts[1]}] if scripts[0] != scripts[1] else []
    args, base_args = results["args"], base_results["args"]
    ignored = BOOKKEEPING_SETTINGS | set(ResNetSkipOptions.__dataclass_fields__)
    for setting in sorted((args.keys() | base_args.keys()) - ignored):
        if args.get(setting) != base_args.get(setting):
            differences.append({"setting": setting, "run": _setting_text(args, setting),
                                "baseline": _setting_text(base_args, setting)})
    return differences


def _setting_text(args: dict, setting: str) -> str:
    """A setting's value for a Markdown table cell."""
    if setting not in args:
        return "(not recorded)"
    value = args[setting]
    return "(not set)" if value is None else f"`{json.dumps(value)}`".replace("|", "\\|")


def comparison_of(results: dict, base_results: dict, rows: list[dict], **extra) -> dict:
    """The template's `comparison`: the baseline's name, the table rows, and the settings that differ."""
    return {"name": f"the {skip_options_of(base_results).label()} baseline", "rows": rows,
            "differences": setting_differences(results, base_results),
            "same_skip": results["skip"] == base_results["skip"], **extra}


def tested_versions(config: dict, libraries: tuple[str, ...]) -> str:
    """The library versions the folder's code is tested with, as its config.json records them, in words."""
    ranges = config.get("rskip_compatibility") or tested_ranges(*libraries)  # folders saved before the record
    return " and ".join(f"{library} {ranges[library].replace(',', ', ')}" for library in libraries)


def describe_variant(skip: dict) -> tuple[str, str]:
    """The run's skip connection in words, and its equation (`SkipOptions.describe`)."""
    return skip_options_of({"skip": skip}).describe()


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def data_source(args: dict) -> tuple[str, str]:
    """The dataset's Hub id (or local path) and a sentence describing it."""
    if args.get("dataset_name"):
        name = args["dataset_name"] + (f" ({args['dataset_config_name']})" if args.get("dataset_config_name") else "")
        return args["dataset_name"], f"[{name}](https://huggingface.co/datasets/{args['dataset_name']})"
    local = Path(args.get("train_file") or args.get("train_dir"))
    return local.resolve().parent.name, f"local files `{local}`"


def translation_card(results: dict, config: dict, repo_id: str, baseline: tuple[dict, dict] | None):
    args, validation, test = results["args"], results["validation"], results.get("test")
    source_lang, target_lang = args["source_lang"], args["target_lang"]
    dataset_id, training_data = data_source(args)
    variant_name, equation = describe_variant(results["skip"])
    evaluation = [{"split": "validation", **validation}] + ([{"split": "test", **test}] if test else [])
    eval_results = [
        EvalResult(task_type="translation", dataset_type=dataset_id, dataset_name=dataset_id, dataset_split=row["split"],
                   metric_type=metric, metric_name=metric_name, metric_value=row[metric],
                   metric_config=row[f"{metric}_signature"])
        for row in evaluation for metric, metric_name in (("bleu", "BLEU"), ("chrf", "chrF"))
    ]
    card_data = ModelCardData(
        language=[source_lang, target_lang], license="apache-2.0", library_name="transformers",
        pipeline_tag="translation", tags=["rskip", "marian", "translation", "custom_code", results["skip"]["skip_variant"]],
        datasets=[args["dataset_name"]] if args.get("dataset_name") else None, metrics=["bleu", "chrf"],
        base_model=args.get("model_name_or_path"), model_name=repo_id, eval_results=eval_results,
    )
    comparison = None
    if baseline:
        rows = [{"name": f"{repo_id} ({skip_options_of(results).label()})", **validation,
                 "test_bleu": (test or {}).get("bleu"), "test_chrf": (test or {}).get("chrf")}]
        base_results, _ = baseline
        rows.append({"name": f"baseline ({skip_options_of(base_results).label()})", **base_results["validation"],
                     "test_bleu": base_results.get("test", {}).get("bleu"),
                     "test_chrf": base_results.get("test", {}).get("chrf")})
        comparison = comparison_of(results, base_results, rows, has_test=bool(test and base_results.get("test")))
    layers = f"{config['encoder_layers']}+{config['decoder_layers']} layers of width {config['d_model']}"
    return card_data, dict(
        source_lang=source_lang, target_lang=target_lang, layers=layers,
        training_summary=(f"{results['steps']} updates (best validation BLEU at update {results['best_step']}), "
                          f"{args.get('model_preset') or args.get('model_name_or_path')}, learning rate "
                          f"{args['learning_rate']}, label smoothing {args['label_smoothing']}."),
        training_data=training_data, evaluation=evaluation, num_beams=args["num_beams"],
        bleu_signature=validation["bleu_signature"], chrf_signature=validation["chrf_signature"],
        example_source="A man is riding a bicycle." if source_lang == "en" else "…",
        comparison=comparison, variant_name=variant_name, equation=equation,
        tested_versions=tested_versions(config, ("transformers",)),
    )


def image_classification_card(results: dict, config: dict, repo_id: str, baseline: tuple[dict, dict] | None):
    args, validation = results["args"], results["validation"]
    dataset_id, training_data = data_source(args)
    variant_name, equation = describe_variant(results["skip"])
    card_data = ModelCardData(
        license="apache-2.0", library_name="transformers", pipeline_tag="image-classification",
        tags=["rskip", "timm", "image-classification", "custom_code", results["skip"]["skip_variant"]],
        datasets=[args["dataset_name"]] if args.get("dataset_name") else None, metrics=["accuracy"],
        model_name=repo_id,
        eval_results=[EvalResult(task_type="image-classification", dataset_type=dataset_id, dataset_name=dataset_id,
                                 dataset_split="validation", metric_type="accuracy", metric_name="top-1 accuracy",
                                 metric_value=validation["top1"])],
    )
    comparison = None
    if baseline:
        base_results, _ = baseline
        comparison = comparison_of(results, base_results, [
            {"name": f"{repo_id} ({skip_options_of(results).label()})", **validation},
            {"name": f"baseline ({skip_options_of(base_results).label()})", **base_results["validation"]},
        ])
    return card_data, dict(
        backbone=config["backbone"], num_labels=len(config["id2label"]),
        training_summary=(f"{results['steps']} updates (best validation top-1 at update {results['best_step']}), "
                          f"{args['optimizer']} at learning rate {args['learning_rate']}, "
                          f"{args['lr_scheduler_type']} schedule, batches of {args['per_device_train_batch_size']}."),
        training_data=training_data, evaluation=[{"split": "validation", **validation}],
        comparison=comparison, variant_name=variant_name, equation=equation,
        tested_versions=tested_versions(config, ("transformers", "timm")),
    )


def write_model_card(output_dir: str | Path, repo_id: str | None = None, baseline: str | Path | None = None,
                     results: dict | None = None) -> Path:
    """Fill the task's template with the run in `output_dir` and save it as `output_dir/README.md`; a `baseline` run
    (of the same task) adds a comparison table and the settings in which its command differs. `results` are the
    run's results.json, read from `output_dir` unless given (a finishing run writes its card before them)."""
    output_dir = Path(output_dir)
    if results is None:
        results, config = read_run(output_dir)
    else:
        config = json.loads((output_dir / "config.json").read_text())
    task = task_of(output_dir, config)
    if baseline is not None:
        baseline = Path(baseline)
        base_results, base_config = read_run(baseline)
        base_task = task_of(baseline, base_config)
        if base_task != task:
            raise ValueError(f"the baseline {baseline} is a {base_task} run and {output_dir} a {task} run; "
                             f"a baseline must be a run of the same task ({task})")
        baseline = (base_results, base_config)
    repo_id = repo_id or results["args"].get("hub_model_id") or output_dir.name
    make_card = translation_card if task == "translation" else image_classification_card
    card_data, fields = make_card(results, config, repo_id, baseline)
    template = (TEMPLATES / f"{task}.md").read_text(encoding="utf-8")
    card = ModelCard.from_template(
        card_data, template_str=template, model_name=repo_id, repo_id=repo_id,
        parameters=f"{results['num_parameters'] / 1e6:.1f}M", command=results["command"],
        train_runtime=format_seconds(results["train_runtime_s"]), hardware=results["hardware"], **fields,
    )
    card.save(output_dir / "README.md")
    return output_dir / "README.md"


__all__ = ["read_run", "skip_options_of", "setting_differences", "write_model_card"]
