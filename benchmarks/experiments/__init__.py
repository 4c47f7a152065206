"""The experiments on the Amazon reviews (not timed benchmarks): one runner per experiment, their
shared statistics (``stats``), their protocols and committed cells (``results/``). The benchmark
suite (benchmarks.run and its modules) never imports this package. See README.md here."""
