"""litefocus.bench: latency and memory benchmarks, recorded as JSON rows under bench/results/."""


def main(argv: list[str] | None = None) -> int:
    """``litefocus-bench`` (one line naming the [bench] extra when its libraries are missing)."""
    from litefocus.extras import run_with_extra

    return run_with_extra(
        "litefocus-bench",
        "bench",
        ("torch", "diffusers", "transformers", "matplotlib"),
        "litefocus.bench.cli:main",
        argv,
    )
