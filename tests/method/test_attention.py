"""The static LiteFocus form against its float64 masked-softmax reference (and the reference itself
against a per-query loop that builds each focus set by hand)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from litefocus import FocusSpec, litefocus_attention, reference_litefocus_attention


def rand_qkv(b, h, n, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(3)]


def brute_force(q, k, v, freq_bins, idx, same_frequency):
    """Per query: list its keys explicitly, one softmax, weighted sum."""
    b, h, n, d = q.shape
    out = torch.empty(b, h, n, d, dtype=torch.float64)
    glob = [] if idx is None else [int(j) for j in idx]
    for i in range(n):
        keys = [j for j in range(n) if j % freq_bins == i % freq_bins] if same_frequency else []
        keys = keys + glob
        logits = torch.einsum("bhd,bhkd->bhk", q[:, :, i].double(), k[:, :, keys].double()) / math.sqrt(d)
        out[:, :, i] = torch.einsum("bhk,bhkd->bhd", logits.softmax(-1), v[:, :, keys].double())
    return out


@pytest.mark.parametrize("same_frequency", [True, False])
def test_reference_matches_brute_force(same_frequency):
    q, k, v = rand_qkv(2, 2, 6 * 4, 3, seed=1)
    idx = torch.tensor([0, 5, 5, 17, 22])  # a repeat; 5 and 17 share bin 1 with query 1
    ref = reference_litefocus_attention(q, k, v, FocusSpec(4, same_frequency=same_frequency), idx)
    torch.testing.assert_close(ref, brute_force(q, k, v, 4, idx, same_frequency), rtol=1e-12, atol=1e-12)


CASES = [
    # b, h, t, freq_bins, d, s
    (1, 1, 5, 8, 4, 0),
    (2, 3, 7, 4, 8, 3),
    (2, 8, 12, 8, 32, 9),
    (3, 2, 9, 2, 16, 18),
    (1, 4, 10, 1, 8, 4),
]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize(
    "case, same_frequency",
    [(c, True) for c in CASES] + [(c, False) for c in CASES if c[-1] > 0],  # global-only needs S > 0
)
def test_static_matches_reference(case, same_frequency, dtype, tol):
    b, h, t, fb, d, s = case
    n = t * fb
    q, k, v = rand_qkv(b, h, n, d, dtype, seed=sum(case))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(7))[:s]
    got = litefocus_attention(q, k, v, FocusSpec(fb, same_frequency=same_frequency), idx)
    ref = reference_litefocus_attention(q, k, v, FocusSpec(fb, same_frequency=same_frequency), idx)
    assert got.shape == (b, h, n, d) and got.dtype == dtype
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


def test_repeated_and_own_bin_indices_count_twice():
    q, k, v = rand_qkv(2, 2, 5 * 4, 8, seed=3)
    idx = torch.tensor([1, 1, 1, 5, 9, 2], dtype=torch.int32)  # 1, 5, 9 all in bin 1
    got = litefocus_attention(q, k, v, FocusSpec(4), idx)
    torch.testing.assert_close(
        got, reference_litefocus_attention(q, k, v, FocusSpec(4), idx), rtol=1e-10, atol=1e-10
    )
    # Counting a duplicate once would be a different answer: the test can tell.
    once = reference_litefocus_attention(q, k, v, FocusSpec(4), torch.tensor([1, 5, 9, 2]))
    assert (got - once).abs().max() > 1e-4


def test_one_softmax_not_two():
    q, k, v = rand_qkv(1, 2, 6 * 4, 8, seed=4)
    idx = torch.tensor([3, 7, 11])
    got = litefocus_attention(q, k, v, FocusSpec(4), idx)
    two = reference_litefocus_attention(q, k, v, FocusSpec(4)) + reference_litefocus_attention(
        q, k, v, FocusSpec(4, same_frequency=False), idx
    )
    assert (got - two).abs().max() > 1e-3
    assert (
        got - reference_litefocus_attention(q, k, v, FocusSpec(4))
    ).abs().max() > 1e-4  # the global part matters


def test_empty_index_means_no_global_part():
    q, k, v = rand_qkv(2, 2, 6 * 4, 8, seed=5)
    empty = torch.zeros(0, dtype=torch.long)
    torch.testing.assert_close(
        litefocus_attention(q, k, v, FocusSpec(4), empty), litefocus_attention(q, k, v, FocusSpec(4), None)
    )


def test_one_bin_no_global_is_full_attention():
    q, k, v = rand_qkv(2, 4, 33, 16, torch.float32, seed=6)
    torch.testing.assert_close(
        litefocus_attention(q, k, v, FocusSpec(1)), F.scaled_dot_product_attention(q, k, v)
    )


def test_scale_is_honoured():
    q, k, v = rand_qkv(1, 2, 8 * 2, 4, seed=8)
    idx = torch.tensor([0, 3])
    got = litefocus_attention(q, k, v, FocusSpec(2, scale=0.3), idx)
    torch.testing.assert_close(got, reference_litefocus_attention(q, k, v, FocusSpec(2, scale=0.3), idx))
    assert (got - litefocus_attention(q, k, v, FocusSpec(2), idx)).abs().max() > 1e-4


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    t=st.integers(1, 9),
    fb=st.integers(1, 6),
    d=st.integers(1, 8),
    s=st.integers(0, 12),
    same=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_static_matches_reference_property(b, h, t, fb, d, s, same, seed):
    n = t * fb
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    idx = torch.randint(0, n, (s,), generator=g)  # with repeats
    if not same and s == 0:
        return
    got = litefocus_attention(q, k, v, FocusSpec(fb, same_frequency=same), idx)
    torch.testing.assert_close(
        got, reference_litefocus_attention(q, k, v, FocusSpec(fb, same_frequency=same), idx)
    )


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda q: (q, q, q, FocusSpec(5), None), "not a multiple of freq_bins"),
        (lambda q: (q, q, q, FocusSpec(4), torch.tensor([0, 24])), "outside"),
        (lambda q: (q, q, q, FocusSpec(4), torch.tensor([-1])), "outside"),
        (lambda q: (q, q[:, :, :20], q, FocusSpec(4), None), "same shape"),
        (lambda q: (q[0], q[0], q[0], FocusSpec(4), None), "4-D"),
        (lambda q: (q, q, q, FocusSpec(4), torch.tensor([[0, 1], [2, 3]])), r"\[S\] or \[B = 1, S\]"),
        (
            lambda q: (q, q, q, FocusSpec(4), torch.zeros(1, 1, 2, dtype=torch.int64)),
            r"\[S\] or \[B = 1, S\]",
        ),
        (lambda q: (q, q, q, FocusSpec(4), torch.tensor([0.0])), "int32 or int64"),
        (lambda q: (q, q, q, FocusSpec(0), None), "positive int"),
        (lambda q: (q, q.float(), q, FocusSpec(4), None), "dtypes differ"),
    ],
)
def test_bad_input_is_a_value_error(make, match):
    q = torch.randn(1, 2, 24, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        litefocus_attention(*make(q))


def test_nothing_to_attend_to_is_an_error():
    q = torch.randn(1, 2, 24, 4)
    with pytest.raises(ValueError, match="same_frequency=False"):
        litefocus_attention(q, q, q, FocusSpec(4, same_frequency=False), None)


@pytest.mark.parametrize("same_frequency", [True, False])
def test_per_row_samples_match_the_reference_and_each_row_alone(same_frequency):
    """global_idx [B, S]: every batch row attends with its own sample (step-level batching of
    requests), equal to the float64 reference and to that row run alone with its 1-D sample."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    b, h, t, f, d, s = 3, 2, 10, 4, 8, 6
    q, k, v = (torch.randn(b, h, t * f, d, generator=g, dtype=torch.float64) for _ in range(3))
    idx = torch.stack([torch.randperm(t * f, generator=g)[:s] for _ in range(b)]).to(torch.int32)
    out = litefocus_attention(q, k, v, FocusSpec(f, same_frequency=same_frequency), idx)
    ref = reference_litefocus_attention(q, k, v, FocusSpec(f, same_frequency=same_frequency), idx)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for i in range(b):
        row = (q[i : i + 1], k[i : i + 1], v[i : i + 1])
        alone = litefocus_attention(*row, FocusSpec(f, same_frequency=same_frequency), idx[i])
        torch.testing.assert_close(out[i : i + 1], alone, atol=1e-12, rtol=1e-12)
    shared = litefocus_attention(q, k, v, FocusSpec(f, same_frequency=same_frequency), idx[0])
    assert not torch.allclose(out[1:], shared[1:])  # the rows' own samples matter: the test can fail
