"""litefocus.bench: latency and memory benchmarks, recorded as JSON rows under bench/results/."""
