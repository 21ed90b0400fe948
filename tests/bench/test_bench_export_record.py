"""The export record's parsing of GNU time's report (the end-to-end record is in test_long_audio)."""

import pytest

from litefocus.bench.probes import export_record as er

REPORT = """INFO validated decode.onnx/waveform
\tCommand being timed: "{command}"
\tUser time (seconds): 3784.84
\tElapsed (wall clock) time (h:mm:ss or m:ss): {wall}
\tMaximum resident set size (kbytes): 13715956
\tExit status: 0
"""


def test_parse_time_v_reads_the_fields():
    got = er.parse_time_v(REPORT.format(command=".venv/bin/litefocus-export --seconds 320", wall="40:00.65"))
    assert got == {
        "command": ".venv/bin/litefocus-export --seconds 320",
        "wall": "40:00.65",
        "max_rss_kib": 13715956,
        "exit_status": 0,
    }


@pytest.mark.parametrize("wall, seconds", [("40:00.65", 2400.65), ("1:02:03", 3723.0), ("0:07.5", 7.5)])
def test_wall_seconds(wall, seconds):
    assert er.wall_seconds(wall) == pytest.approx(seconds)


def test_parse_time_v_refuses_other_logs():
    with pytest.raises(ValueError, match="not litefocus-export"):
        er.parse_time_v(REPORT.format(command="bash .ci/run", wall="1:00"))
    with pytest.raises(ValueError, match="Maximum resident set size"):
        er.parse_time_v(REPORT.format(command="litefocus-export", wall="1:00").replace("Maximum", "Max"))


def test_main_answers_bad_paths_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        er.main([str(tmp_path), "80s-fp32", str(tmp_path / "log"), "--commit", "x"])
    assert e.value.code == 2
    assert "not an engine directory" in capsys.readouterr().err
