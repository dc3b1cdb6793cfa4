"""One-off tools: training of the embedded model, diagnostics, packaging. Run from the repository
root as modules, e.g. ``python -m scripts.train_tiny_pixart --help``."""
