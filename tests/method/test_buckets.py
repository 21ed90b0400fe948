import pytest

from litefocus import LiteFocusConfig
from litefocus.buckets import MAX_SECONDS, Bucket


@pytest.mark.parametrize(
    "seconds, frames, exact, tokens8, s",
    [
        (10, 256, 10.24, 1024, 102),
        (20, 504, 20.16, 2016, 201),
        (40, 1000, 40.0, 4000, 400),
        (80, 2000, 80.0, 8000, 800),
        (160, 4000, 160.0, 16000, 1600),
        (7, 176, 7.04, 704, 70),
    ],
)
def test_buckets_pad_to_a_multiple_of_8(seconds, frames, exact, tokens8, s):
    b = Bucket.for_seconds(seconds)
    assert (b.frames, b.exact_seconds, b.tokens(8), b.num_global(LiteFocusConfig(), 8)) == (
        frames,
        exact,
        tokens8,
        s,
    )
    assert b.frames % 8 == 0 and b.exact_seconds >= seconds
    assert b.samples == round(exact * 16000) and b.latent_shape == (8, frames, 16)
    assert b.grid(4) == (frames // 4, 4) and b.grid(2) == (frames // 8, 2)


def test_bucket_is_public():
    import litefocus

    assert litefocus.Bucket is Bucket


def test_bucket_dict_is_json_ready():
    d = Bucket.for_seconds(80).to_dict(LiteFocusConfig())
    assert d["num_global"] == {"8": 800} and d["tokens"] == {"8": 8000, "4": 2000, "2": 500}


@pytest.mark.parametrize(
    "bad, match",
    [
        (0, "positive"),
        (-1, "positive"),
        (float("nan"), "positive"),
        ("x", "a number"),
        (MAX_SECONDS + 1, "above the maximum"),
        (True, "positive"),
    ],
)
def test_bad_seconds(bad, match):
    with pytest.raises(ValueError, match=match):
        Bucket.for_seconds(bad)


def test_bad_frames_and_levels():
    with pytest.raises(ValueError, match="multiple of 8"):
        Bucket(seconds=1.0, frames=30)
    with pytest.raises(ValueError, match="holds"):
        Bucket(seconds=5.0, frames=8)
    with pytest.raises(ValueError, match="no UNet level has 3"):
        Bucket.for_seconds(1).grid(3)
