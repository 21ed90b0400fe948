"""litefocus.serve: LiteFocus text-to-audio at scale on Ray Serve, with step-level batching.

``litefocus-serve --engines DIR`` starts (or joins, ``--address``) a Ray cluster and deploys an HTTP
ingress, a text-conditioning deployment, one denoiser deployment per bucket (a running batch that
requests join and leave at step boundaries) and a decoder. Needs the [serve] extra (Ray Serve).
"""


def main(argv: list[str] | None = None) -> int:
    """``litefocus-serve`` (one line naming the [serve] extra when Ray Serve is missing)."""
    from litefocus.extras import run_with_extra

    return run_with_extra(
        "litefocus-serve", "serve", ("ray", "fastapi", "yaml"), "litefocus.serve.cli:main", argv
    )
