import json

import pytest

from litefocus.bench import attention as attention_bench
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


def test_attention_bench_writes_json_rows(tmp_path):
    assert (
        attention_bench.main(
            ["--seconds", "0.5", "--repeats", "2", "--warmup", "0", "--out", str(tmp_path), "-q"]
        )
        == 0
    )
    (path,) = tmp_path.glob("attention-cpu-*.json")
    record = json.loads(path.read_text())
    rows = record["rows"]
    assert [r["method"] for r in rows] == ["full_sdpa", "litefocus"]
    assert rows[1]["N"] == 7 * 8 and rows[1]["S"] == 5  # 0.5 s: 13 latent frames, 7 at the F = 8 level
    assert all(r["ms_p10"] <= r["ms_p50"] <= r["ms_p90"] for r in rows)
    assert rows[1]["gflop"] < rows[0]["gflop"] and rows[1]["speedup_vs_full"] > 0
    assert not list(tmp_path.glob("*.tmp"))


def test_attention_bench_rejects_bad_seconds(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        attention_bench.main(["--seconds", "-3", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--seconds values must be in (0, 600], got -3.0" in capsys.readouterr().err
