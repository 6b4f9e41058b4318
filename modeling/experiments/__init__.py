"""The experiments behind the README's Results, as a library: `rskip-reproduce` is their command line.

- `runner`: a grid of training runs, one folder per run keyed by its settings, run side by side (one process per
  core, one thread each); running it again skips finished runs and resumes interrupted ones from their checkpoints.
- `gradients`: gradient norms and output change at initialisation, by variant and depth (measured, not trained).
- `stability`, `translation`, `cifar`, `bn`, `depth_map`, `cifar_converged`: the training experiments, each a grid of
  the runner with the same interface: `PRESETS`, `prepare(preset, output_dir, data_dir)`,
  `run_specs(preset, seeds, *prepared)` and `summarise(preset, seeds, output_dir, specs)` (tables and plots rebuilt
  from the finished runs).
- `number_task`: the generated English -> German number-words task of `make demo` (data and tokenizer).
- `variants`: the variants the experiments compare, by label, as the training commands' --skip_* flags.
- `depth_rules`: the depth map's regimes and the rule that calls a translation run one that trains, stalls or
  diverges (standard library only: the GPU script uses it too).
- `summaries`: mean ± std over seeds, the rule that calls a difference within the seeds' spread none, the binomial
  error of an accuracy, curves averaged over seeds.
- `train_run`: one run of a grid, in its own process (a diverged run is an outcome, not a failure).
- `gpu_evidence`, `gpu_evidence_pack`: `scripts/gpu_evidence.sh`, the GPU half of the results within a wall-time
  budget, and the folder it carries (prepared here).
"""
