"""rskip's commands: each module has `main(argv=None)` and `run()`, the console script installed with the package."""
