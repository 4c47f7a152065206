"""fastmft's benchmark suite: one harness (benchmarks.harness), one module per op and end to end
(benchmarks/bench_<name>.py), results stored as data (benchmarks/results/). See benchmarks/README.md."""
