import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from litefocus import LiteFocusConfig


def test_defaults_are_the_paper_setting():
    c = LiteFocusConfig()
    assert (c.same_frequency, c.cross_frequency, c.sparse_ratio, c.index_mode) == (
        True,
        True,
        0.1,
        "resample",
    )
    assert c.freq_bins == (8,)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"sparse_ratio": 0.0}, "sparse_ratio"),
        ({"sparse_ratio": 1.5}, "sparse_ratio"),
        ({"sparse_ratio": -0.1}, "sparse_ratio"),
        ({"sparse_ratio": float("nan")}, "sparse_ratio"),
        ({"sparse_ratio": "0.1"}, "sparse_ratio"),
        ({"same_frequency": False, "cross_frequency": False}, "same_frequency and cross_frequency"),
        ({"index_mode": "random"}, "index_mode"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"same_frequency": 1}, "same_frequency"),
        ({"freq_bins": ()}, "freq_bins"),
        ({"freq_bins": (8, 0)}, "freq_bins"),
        ({"freq_bins": (8, 8)}, "freq_bins"),
    ],
)
def test_invalid_fields_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LiteFocusConfig(**kwargs)


def test_frozen():
    with pytest.raises(AttributeError):
        LiteFocusConfig().sparse_ratio = 0.2


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="ratio"):
        LiteFocusConfig.from_dict({"ratio": 0.1})


def test_num_global_is_exact_floor():
    assert LiteFocusConfig().num_global(8000) == 800
    assert LiteFocusConfig(sparse_ratio=0.29).num_global(100) == 29  # 0.29 * 100 == 28.999... in floats
    assert LiteFocusConfig(sparse_ratio=0.1).num_global(9) == 0
    assert LiteFocusConfig(cross_frequency=False).num_global(8000) == 0


@given(
    same=st.booleans(),
    cross=st.booleans(),
    ratio=st.floats(min_value=1e-6, max_value=1.0),
    mode=st.sampled_from(["resample", "fixed"]),
    seed=st.integers(0, 2**31),
    bins=st.lists(st.integers(1, 64), min_size=1, max_size=3, unique=True),
)
def test_json_round_trip(same, cross, ratio, mode, seed, bins):
    if not (same or cross):
        return
    c = LiteFocusConfig(same, cross, ratio, mode, seed, tuple(bins))
    back = LiteFocusConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c
    assert back.num_global(12345) == c.num_global(12345)
