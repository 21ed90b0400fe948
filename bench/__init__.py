"""litefocus.bench: latency and memory benchmarks, recorded as JSON rows under bench/results/."""


def main(argv: list[str] | None = None) -> int:
    """``litefocus-bench`` (one line naming the [bench] extra when its libraries are missing)."""
    import sys

    from litefocus.extras import run_with_extra

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # the serving benchmark: HTTP clients against Ray Serve, no torch
        return run_with_extra(
            "litefocus-bench serve",
            "bench,serve",
            ("requests", "matplotlib"),
            "litefocus.bench.serve:main",
            argv[1:],
        )
    return run_with_extra(
        "litefocus-bench",
        "bench",
        ("torch", "diffusers", "transformers", "matplotlib"),
        "litefocus.bench.cli:main",
        argv,
    )
