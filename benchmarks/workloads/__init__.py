"""The benchmark suite's workloads (benchmarks/suite.py runs them): one module per family, each
building a JAX and a PyTorch runner of the same step."""
