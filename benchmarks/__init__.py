"""netsim micro-benchmarks: run each as ``python -m benchmarks.<name>``."""
