"""litefocus-bench: a --quick run on the tiny preset measures every CPU backend and writes a valid
JSON record, Markdown table and PNG plot; ``report`` re-renders and compares; bad input fails clearly."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from litefocus.bench import cli
from litefocus.bench.measure import PeakMemory, matmul_ceiling_tflops, quantile, summarize_ms
from litefocus.bench.record import ROW_FIELDS
from litefocus.bench.report import (
    load_record,
    render_comparison,
    render_decode_table,
    render_markdown,
    render_report,
    speedups,
)
from litefocus.bench.stages import DECODE_FIELDS, measure_decode
from litefocus.bench.targets import BACKENDS, unavailable_reason
from litefocus.buckets import Bucket
from litefocus.engine.contract import DecodeContract

CPU_BACKENDS = ("diffusers", "diffusers-compile", "litefocus", "litefocus-compile", "onnxruntime")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OLD_RECORD = Path(__file__).resolve().parents[2] / "bench" / "results" / "unet-cpu-20261127T205355Z.json"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run (tiny preset, 5 s, every backend) shared by the tests of this module."""
    out = tmp_path_factory.mktemp("bench")
    rc = cli.main(["--quick", "--out", str(out), "-q"])
    (path,) = out.glob("unet-cpu-*.json")
    return rc, path, json.loads(path.read_text())


def test_quick_run_measures_every_cpu_backend(quick_run):
    rc, path, record = quick_run
    assert rc == 0
    assert record == load_record(path)  # schema and required fields check out
    assert record["options"]["source"] == "random:tiny:0"
    assert record["options"]["isolate"] is True  # CPU default: every row in a fresh process
    rows = {r["backend"]: r for r in record["rows"]}
    assert set(rows) == set(CPU_BACKENDS)
    for backend, r in rows.items():
        assert all(r[f] is not None for f in ROW_FIELDS), backend
        assert r["device"] == record["device"] and r["seconds"] == 5.0 and r["precision"] == "fp32"
        assert 0 < r["step_ms_p10"] <= r["step_ms_p50"] <= r["step_ms_p90"]
        assert len(r["step_ms_all"]) == 3 and r["step_ms_p50"] == float(np.median(r["step_ms_all"]))
        assert r["generate_s"] > 0 and r["generate_s"] == pytest.approx(r["denoise_s"] + r["decode_s"])
        assert r["peak_mem_mb"] > 50 and r["mem_kind"] == "rss"
        assert r["achieved_tflops"] == pytest.approx(r["step_gflop"] / r["step_ms_p50"])
        assert r["ceiling_fraction"] == pytest.approx(
            r["achieved_tflops"] / record["matmul_ceiling"]["tflops"]
        )
        assert r["litefocus"] == (not backend.startswith("diffusers"))
        # the decode alone: 1 warm-up + 1 timed call, its absolute peak and its own working memory
        assert r["decode_warmup"] == 1 and r["decode_repeats"] == 1 and len(r["decode_ms_all"]) == 1
        assert math.isfinite(r["decode_ms_p50"]) and r["decode_ms_p50"] > 0, backend
        assert r["decode_ms_p50"] == r["decode_ms_all"][0]
        assert r["decode_peak_mem_mb"] >= 0 and r["decode_mem_delta_mb"] is not None, backend
        assert 0 <= r["decode_mem_delta_mb"] <= r["decode_peak_mem_mb"], backend
    # LiteFocus does less attention work; the analytic count says so and is the same for its backends
    assert rows["litefocus"]["step_gflop"] < rows["diffusers"]["step_gflop"]
    assert rows["litefocus"]["step_gflop"] == rows["onnxruntime"]["step_gflop"]
    assert rows["onnxruntime"]["provider"] == "CPUExecutionProvider"
    # compiled targets: timed separately, and numerically the same module as eager
    for backend in ("diffusers-compile", "litefocus-compile"):
        assert rows[backend]["compiled"] and rows[backend]["compile_s"] > 0
        assert rows[backend]["max_abs_vs_eager"] < 1e-4
    assert rows["diffusers"]["compile_s"] is None
    skipped = {s["backend"]: s for s in record["skipped"]}  # what needs a GPU, each with its reason
    assert set(skipped) == {"onnxruntime-cudagraph", "tensorrt"}
    assert all(s["status"] == "unavailable" for s in skipped.values())
    assert "TensorRT" in skipped["tensorrt"]["reason"]
    assert skipped["onnxruntime-cudagraph"]["reason"] == "CUDA graphs need a CUDA GPU (--device cuda)"
    assert record["versions"]["torch"] and record["git"]["commit"]
    assert record["command"].startswith("litefocus-bench --quick")


def test_quick_run_writes_markdown_and_png(quick_run):
    _, path, record = quick_run
    md = path.with_suffix(".md").read_text()
    assert md == render_report([record]) == render_markdown(record) + "\n" + render_decode_table([record])
    assert "| decode s | decode MB |" in md and "## Decode per bucket" in md
    assert "during the UNet steps only" in md
    for backend in CPU_BACKENDS:
        assert f"| 5 | {backend} | fp32 |" in md
    assert "| 5 | diffusers | fp32 |" in md and "1.00x" in md
    assert "tensorrt at 5 s: unavailable" in md
    png = path.with_suffix(".png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    from PIL import Image

    with Image.open(path.with_suffix(".png")) as im:
        assert im.size[0] > 800 and im.size[1] > 400


def test_report_round_trips_and_compares(quick_run, tmp_path, capsys):
    _, path, record = quick_run
    assert cli.main(["report", str(path), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again.md").read_text() == path.with_suffix(".md").read_text()
    assert (tmp_path / "again.png").read_bytes().startswith(PNG_MAGIC)

    slower = copy.deepcopy(record)  # a second "run": every step twice as slow, one row missing
    slower["created"] = "20990101T000000Z"
    for r in slower["rows"]:
        for k in ("step_ms_p10", "step_ms_p50", "step_ms_p90"):
            r[k] *= 2
    slower["rows"] = [r for r in slower["rows"] if r["backend"] != "onnxruntime"]
    second = tmp_path / "second.json"
    second.write_text(json.dumps(slower))
    assert cli.main(["report", str(path), str(second), "--out", str(tmp_path / "cmp")]) == 0
    cmp = (tmp_path / "cmp.md").read_text()
    assert cmp.startswith(render_comparison([record, slower]))
    assert "| 5 | diffusers | fp32 |" in cmp and "| 2.00 |" in cmp
    onnx_line = next(line for line in cmp.splitlines() if line.startswith("| 5 | onnxruntime | fp32 |"))
    assert onnx_line.endswith("| – | – |")  # measured in run 1 only: no ratio invented
    assert str(tmp_path / "cmp.md") in capsys.readouterr().out


def test_speedups_are_ratios_within_one_run():
    def row(backend, seconds, ms):
        return {"backend": backend, "seconds": seconds, "precision": "fp32", "step_ms_p50": ms}

    record = {"rows": [row("diffusers", 10, 100.0), row("litefocus", 10, 40.0), row("litefocus", 20, 50.0)]}
    assert speedups(record) == {("diffusers", 10, "fp32"): 1.0, ("litefocus", 10, "fp32"): 2.5}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seconds", "-3"], "seconds"),
        (["--seconds", "nan"], "seconds"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--device", "tpu"], "--device"),
        (["--preset", "huge"], "huge"),
        (["--repeats", "0"], "repeats"),
        (["--steps", "-1"], "steps"),
        (["--sparse-ratio", "2"], "sparse_ratio"),
        (["--backends", "tvm"], "invalid choice"),
        (["--model", "some/model", "--preset", "tiny"], "not both"),
        (["--compile-mode", "fastest"], "invalid choice"),
        (["--decode-repeats", "-1"], "--decode-repeats"),
        (["--decode-warmup", "-1"], "--decode-warmup"),
    ],
)
def test_bad_run_arguments_exit_2_naming_the_value(argv, message, capsys, tmp_path):
    if argv[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--out", str(tmp_path)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_decode_repeats_0_skips_the_decode_measurement(tmp_path):
    argv = ["--quick", "--backends", "litefocus", "--seconds", "1", "--steps", "1", "--decode-repeats", "0"]
    assert cli.main([*argv, "--no-isolate", "--out", str(tmp_path), "-q"]) == 0
    (path,) = tmp_path.glob("unet-cpu-*.json")
    record = load_record(path)
    assert record["options"]["isolate"] is False  # measured in this process
    (row,) = record["rows"]
    assert all(row[f] is None for f in DECODE_FIELDS) and row["decode_repeats"] == 0
    assert row["generate_s"] > 0 and row["peak_mem_mb"] > 0  # the rest is measured as before
    assert record["options"]["decode_repeats"] == 0
    md = path.with_suffix(".md").read_text()
    assert "## Decode per bucket" not in md and render_decode_table([record]) == ""


def _decode_target(decode):
    contract = DecodeContract(Bucket.for_seconds(1))
    return SimpleNamespace(backend="fake", module=None, decode=decode, decode_contract=contract)


def test_decode_memory_is_the_peak_above_the_resident_baseline():
    calls = []

    def decode(inputs):  # 64 MiB of working memory per call, touched, then freed
        assert inputs["latent"].shape == (1, 8, Bucket.for_seconds(1).frames, 16)
        calls.append(inputs["latent"].copy())
        work = np.ones(64 * 2**20 // 8)
        work += 1
        return np.zeros((1, 16000), np.float32)

    held = np.ones(128 * 2**20 // 8)  # resident before the decode: in the peak, not in the delta
    held += 1
    d = measure_decode(_decode_target(decode), torch.device("cpu"), warmup=2, repeats=3, seed=7)
    assert len(calls) == 5 and all(np.array_equal(c, calls[0]) for c in calls)  # one fixed latent
    assert d["decode_warmup"] == 2 and d["decode_repeats"] == 3 and len(d["decode_ms_all"]) == 3
    assert 50 < d["decode_mem_delta_mb"] < 120
    assert d["decode_peak_mem_mb"] > d["decode_mem_delta_mb"] + 100  # the held array is resident
    del held
    nan = _decode_target(lambda inputs: np.full((1, 16000), np.nan, np.float32))
    with pytest.raises(RuntimeError, match="not finite"):
        measure_decode(nan, torch.device("cpu"), warmup=0, repeats=1, seed=0)


def _decode_row(backend, seconds, ms, delta, peak):
    return {
        "backend": backend,
        "seconds": seconds,
        "precision": "fp32",
        "mem_kind": "rss",
        "decode_ms_p50": ms,
        "decode_mem_delta_mb": delta,
        "decode_peak_mem_mb": peak,
    }


def test_decode_table_has_a_column_group_per_backend_and_mb_per_second():
    rows = [
        _decode_row("onnxruntime", 20, 2000.0, 400.0, 3000.0),
        _decode_row("diffusers", 10, 1500.0, 250.0, 2500.0),
        _decode_row("onnxruntime", 10, 1000.0, 200.0, 2600.0),
        {"backend": "litefocus", "seconds": 10, "precision": "fp32", "mem_kind": "rss"},  # an old row
    ]
    lines = render_decode_table([{"rows": rows}]).splitlines()
    assert lines[0] == "## Decode per bucket"
    assert lines[2] == (
        "| seconds | diffusers decode s | diffusers decode MB | diffusers peak MB | onnxruntime decode s "
        "| onnxruntime decode MB | onnxruntime peak MB | MB per s of audio |"
    )
    assert lines[3] == "|---:" * 8 + "|"
    assert lines[4] == "| 10 | 1.500 | 250 | 2500 | 1.000 | 200 | 2600 | 20.0 |"
    assert lines[5] == "| 20 | – | – | – | 2.000 | 400 | 3000 | 20.0 |"  # linear: the same MB per s
    assert "rss" in lines[7]
    two = render_decode_table([{"rows": rows}, {"rows": rows[:1]}]).splitlines()
    assert "run 2 onnxruntime decode s" in two[2] and two[2].endswith(
        "| run 1 onnxruntime MB per s of audio | run 2 onnxruntime MB per s of audio |"
    )
    assert render_decode_table([{"rows": rows[3:]}]) == ""


def test_an_old_record_without_decode_fields_still_renders(tmp_path):
    record = load_record(OLD_RECORD)
    assert not any("decode_ms_p50" in r for r in record["rows"])
    md = render_report([record])
    assert md == render_markdown(record) and render_decode_table([record]) == ""
    line = next(x for x in md.splitlines() if x.startswith("| 10 | onnxruntime | fp32 |"))
    assert "| – | – | 316.2 |" in line  # no decode s, no decode MB
    assert "during the timed steps and the generation" in md  # the old records' peak, described as such
    assert cli.main(["report", str(OLD_RECORD), "--out", str(tmp_path / "old")]) == 0
    assert (tmp_path / "old.md").read_text() == md


def test_a_model_that_is_not_audioldm2_exits_2_before_measuring(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        cli.main(["--model", str(tmp_path / "empty"), "--seconds", "5", "--out", str(tmp_path / "out"), "-q"])
    assert e.value.code == 2
    assert "not an AudioLDM2 diffusers directory" in capsys.readouterr().err
    assert not list((tmp_path / "out").iterdir())


def test_bad_report_input_exits_2(tmp_path, capsys, quick_run):
    _, path, record = quick_run
    cases = {
        tmp_path / "list.json": "a JSON list, not an object",
        tmp_path / "missing.json": "no such file",
        tmp_path / "broken.json": "not a litefocus-bench JSON record",
        tmp_path / "other.json": "not a litefocus-bench record",
        tmp_path / "norow.json": "lacks step_ms_p90",
        tmp_path / "future.json": "schema_version 99",
    }
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "attention"}))
    bad_row = copy.deepcopy(record)
    del bad_row["rows"][0]["step_ms_p90"]
    (tmp_path / "norow.json").write_text(json.dumps(bad_row))
    (tmp_path / "future.json").write_text(json.dumps({**record, "schema_version": 99}))
    for file, message in cases.items():
        with pytest.raises(SystemExit) as e:
            cli.main(["report", str(file)])
        assert e.value.code == 2
        assert message in capsys.readouterr().err, file
    with pytest.raises(SystemExit):
        cli.main(["report", str(path), "--out", str(tmp_path / "no" / "such" / "dir" / "x")])
    assert "does not exist" in capsys.readouterr().err


def test_unavailable_backends_say_why():
    assert unavailable_reason("diffusers", torch.device("cpu")) is None
    assert unavailable_reason("onnxruntime", torch.device("cpu")) is None
    reason = unavailable_reason("tensorrt", torch.device("cpu"))
    assert reason and ("TensorRT" in reason)
    with pytest.raises(ValueError, match="unknown backend"):
        unavailable_reason("tvm", torch.device("cpu"))
    assert set(BACKENDS) == {*CPU_BACKENDS, "onnxruntime-cudagraph", "tensorrt"}


def test_quantiles_match_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 17):
        xs = rng.random(n).tolist()
        for q in (0.1, 0.5, 0.9):
            assert quantile(xs, q) == pytest.approx(float(np.quantile(xs, q)))
        s = summarize_ms(xs)
        assert s["p50"] == pytest.approx(float(np.median(xs)))
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_peak_memory_resets_between_measurements():
    mem = PeakMemory(torch.device("cpu"))
    mem.reset()
    before = mem.peak_mb()
    big = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    big += 1
    peak = mem.peak_mb()
    assert peak - before > 50
    del big
    mem.reset()
    assert mem.peak_mb() < peak - 50


def test_matmul_ceiling_is_measured():
    t0 = time.perf_counter()
    c = matmul_ceiling_tflops(torch.device("cpu"), torch.float32, n=256, warmup=1, repeats=3)
    assert c["n"] == 256 and c["dtype"] == "float32"
    assert math.isfinite(c["tflops"]) and c["tflops"] > 0
    assert c["tflops"] == pytest.approx(2 * 256**3 / c["ms"] / 1e9)
    assert time.perf_counter() - t0 < 30


def test_bench_options_round_trip_through_json(tmp_path):
    from litefocus.bench.options import BenchOptions
    from litefocus.config import LiteFocusConfig

    opts = BenchOptions(
        seconds=(5.0, 10.0),
        backends=("diffusers", "onnxruntime"),
        engines=tmp_path / "e",
        out=tmp_path / "o",
        litefocus=LiteFocusConfig(sparse_ratio=0.2),
        generate_at=(10.0,),
        isolate=True,
        quiet=True,
    )
    again = BenchOptions.from_dict(json.loads(json.dumps(opts.to_dict())), quiet=True)
    assert again == opts


def test_an_isolated_row_whose_process_dies_is_recorded_not_raised(tmp_path, monkeypatch):
    import subprocess

    from litefocus.bench import isolated
    from litefocus.bench.options import BenchOptions
    from litefocus.bench.targets import TargetSpec
    from litefocus.config import LiteFocusConfig

    opts = BenchOptions(seconds=(5.0,), backends=("diffusers",), out=tmp_path, isolate=True)
    spec = TargetSpec("random:tiny:0", torch.device("cpu"), "fp32", LiteFocusConfig())
    calls = []

    def killed(cmd, check):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, -9)  # what the OOM killer leaves

    monkeypatch.setattr(isolated.subprocess, "run", killed)
    rows, skipped = isolated.run_isolated(opts, "diffusers", Bucket.for_seconds(5.0), spec)
    assert rows == [] and skipped[0]["status"] == "oom" and "SIGKILL" in skipped[0]["reason"]
    assert calls and calls[0][1:4] == ["-P", "-m", "litefocus.bench.isolated"]
    child = isolated.row_options(opts, "diffusers", 5.0)
    assert child.backends == ("diffusers",) and child.seconds == (5.0,) and not child.isolate
