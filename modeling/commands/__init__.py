"""rskip's commands: each module has `main(argv=None)` and `run()`, the console script that pip installs
(`COMMANDS`). Every module runs as `python -m rskip.commands.<module>`, and the training ones under Accelerate's
launcher as `accelerate launch -m rskip.commands.train_translation ...`."""

# The console scripts and their modules, as pyproject.toml's [project.scripts] declares them.
COMMANDS = {
    "rskip-train-translation": "rskip.commands.train_translation",
    "rskip-train-image-classification": "rskip.commands.train_image_classification",
    "rskip-model-card": "rskip.commands.model_card",
    "rskip-push-to-hub": "rskip.commands.push_to_hub",
    "rskip-compare-runs": "rskip.commands.compare_runs",
    "rskip-benchmark": "rskip.commands.benchmark",
    "rskip-reproduce": "rskip.commands.reproduce",
    "rskip-export": "rskip.commands.export",
    "rskip-benchmark-deploy": "rskip.commands.benchmark_deploy",
}
