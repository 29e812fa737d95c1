"""netsim micro-benchmarks: run each as ``python -m netsim.bench.<name>``."""
