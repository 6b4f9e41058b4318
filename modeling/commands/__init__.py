"""rskip's commands. Each module has `main(argv=None)` and `run()`, the console script installed with the package:

| console script                      | module                                      |
|-------------------------------------|---------------------------------------------|
| `rskip-train-translation`           | `rskip.commands.train_translation`          |
| `rskip-train-image-classification`  | `rskip.commands.train_image_classification` |
| `rskip-model-card`                  | `rskip.commands.model_card`                 |
| `rskip-push-to-hub`                 | `rskip.commands.push_to_hub`                |
| `rskip-compare-runs`                | `rskip.commands.compare_runs`               |
| `rskip-benchmark`                   | `rskip.commands.benchmark`                  |
| `rskip-reproduce`                   | `rskip.commands.reproduce`                  |

The training commands also run under Accelerate's launcher as modules:
`accelerate launch -m rskip.commands.train_translation ...`. `python -m rskip.commands.<module>` works for every one.
"""
