"""``litefocus-generate`` command lines for the runtime tests: one short request against an engine directory."""

from __future__ import annotations


def cli_args(engines, out, *extra, prompt="a dog barks", steps=2) -> list[str]:
    """A 0.5 s request of ``steps`` steps from ``engines`` to ``out``, then ``extra`` flags."""
    return [
        prompt,
        "--seconds",
        "0.5",
        "--engines",
        str(engines),
        "-o",
        str(out),
        "--steps",
        str(steps),
        *extra,
    ]
