"""The experiments behind the README's Results, as a library: `rskip-reproduce` is their command line.

- `runner`: a grid of training runs, one folder per run keyed by its settings, run side by side (one process per
  core, one thread each); running it again skips finished runs and resumes interrupted ones from their checkpoints.
- `number_task`: the generated English -> German number-words task of `make demo` (data and tokenizer).
- `depth_map`: post-LN, pre-LN and rSkip+LN by depth and learning-rate regime on the number task, trained to the end.
- `summaries`: mean ± std over seeds and the rule that calls a difference within the seeds' spread none.
"""
