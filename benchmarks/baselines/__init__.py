"""Plain baselines the benchmarks compare fastmft against (written with eager PyTorch ops)."""
