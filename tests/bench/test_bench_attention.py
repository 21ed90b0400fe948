import json

import pytest

from litefocus.bench import attention as attention_bench


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
