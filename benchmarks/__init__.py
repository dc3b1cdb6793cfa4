"""Speed, memory and quality benchmarks (results under benchmarks/results/, listed in
benchmarks/README.md). Run from the repository root as modules, e.g. ``python -m benchmarks.bench_linear``."""
