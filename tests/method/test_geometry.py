import pytest

from litefocus.geometry import latent_frames, level_frames


@pytest.mark.parametrize(
    "seconds, frames, tokens8",
    [(10, 250, 1000), (20, 500, 2000), (40, 1000, 4000), (80, 2000, 8000), (160, 4000, 16000), (7, 175, 704)],
)
def test_latent_geometry_matches_the_reference_table(seconds, frames, tokens8):
    assert latent_frames(seconds) == frames
    assert level_frames(frames, 1) * 8 == tokens8


def test_geometry_rounds_up_to_cover_the_request():
    assert latent_frames(10.001) == 251  # 1001 mel frames -> 1004 -> 251 latent frames
    assert level_frames(125, 1) == 63


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "10"])
def test_geometry_rejects_bad_seconds(bad):
    with pytest.raises(ValueError, match="seconds must be a positive finite number"):
        latent_frames(bad)
