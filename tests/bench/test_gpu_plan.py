"""The prepared GPU measurement and what the first H100 run found: the plan and its dry run, clean
stops at a time budget, fp16 validation at the precision's resolution, the recorded git state,
compile-mode labels, export --device, ONNX Runtime IO binding's guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from litefocus.bench import gpu_plan
from litefocus.bench import row as bench_run
from litefocus.bench.cli import main as bench_main
from litefocus.bench.options import BenchOptions
from litefocus.bench.report import backend_label, render_comparison, render_markdown
from litefocus.bench.run import Stopped, run_benchmark
from litefocus.export.validate import compare, within_tolerance

REPO = Path(__file__).resolve().parents[2]


def test_plan_checks_out_and_fits_what_comes_back(tmp_path):
    assert gpu_plan.check(tmp_path) == []
    for phase in gpu_plan.PHASES.values():
        names = gpu_plan.output_names(phase)
        assert len(names) <= gpu_plan.MAX_OUT_FILES and len(set(names)) == len(names)
        for run in phase.runs:
            argv = gpu_plan.bench_argv(run, tmp_path)
            assert argv[:4] == ["--device", "cuda", "--precision", "fp16"] and argv[-2:] == [
                "--out",
                str(tmp_path),
            ]


def test_a_bad_planned_run_is_reported(tmp_path, monkeypatch):
    bad = gpu_plan.Phase("A", 60, (gpu_plan.Run("x", ("--seconds", "-3"), 60),), "bad")
    monkeypatch.setattr(gpu_plan, "PHASES", {"A": bad})
    (problem,) = gpu_plan.check(tmp_path)
    assert "run x" in problem and "-3" in problem


def test_rehearsal_maps_every_length_to_the_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv(gpu_plan.REHEARSE_ENV, "1")
    for phase in gpu_plan.PHASES.values():
        for run in phase.runs:
            argv = gpu_plan.bench_argv(run, tmp_path)
            assert argv[:8] == [
                "--device",
                "cpu",
                "--precision",
                "fp32",
                "--preset",
                "tiny",
                "--text-len",
                "16",
            ]
            for flag in ("--seconds", "--generate-at"):
                if flag in argv:
                    assert argv[argv.index(flag) + 1] == "5" and not argv[argv.index(flag) + 2].isdigit()


def test_dry_run_script_passes():
    env = dict(os.environ, PYTHON=sys.executable)
    p = subprocess.run(
        ["bash", "bench/gpu/run.sh", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert "dry run passed" in p.stdout
    bad = subprocess.run(
        ["bash", "bench/gpu/run.sh", "nope"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown step 'nope'" in bad.stderr


def test_wheel_pins_are_exact_and_hashed():
    lines = [ln for ln in (REPO / "bench/gpu/wheels.txt").read_text().splitlines() if ln and ln[0] != "#"]
    assert {ln.split()[1].split("==")[0] for ln in lines} >= {"diffusers", "onnxruntime-gpu"}
    for ln in lines:
        phase, req, h = ln.split()
        assert phase in "AB" and "==" in req and h.startswith("--hash=sha256:") and len(h) == 14 + 64


def _tiny_options(tmp_path, **kw):
    base = dict(seconds=(5,), backends=("diffusers", "litefocus"), source="random:tiny:0", steps=0, warmup=0)
    base.update(repeats=1, text_len=16, engines=tmp_path / "engines", out=tmp_path, quiet=True)
    return BenchOptions(**{**base, **kw})


def test_time_budget_skips_rows_and_still_writes_the_record(tmp_path):
    rc = bench_main(
        [
            "--quick",
            "--time-budget",
            "0.001",
            "--backends",
            "diffusers",
            "litefocus",
            "--out",
            str(tmp_path),
            "-q",
        ]
    )
    assert rc == 1  # nothing measured
    (path,) = tmp_path.glob("unet-cpu-*.json")
    record = json.loads(path.read_text())
    assert record["rows"] == [] and [s["status"] for s in record["skipped"]] == ["budget", "budget"]
    assert "time budget of 0.001 s" in record["skipped"][0]["reason"]


def test_a_stop_mid_row_records_it_and_starts_nothing_after(tmp_path, monkeypatch):
    def stop(*args, **kwargs):
        raise Stopped("SIGTERM")

    monkeypatch.setattr(bench_run, "open_target", stop)
    record = run_benchmark(_tiny_options(tmp_path), checkpoint=tmp_path)
    first, second = record["skipped"]
    assert first["status"] == second["status"] == "budget"
    assert first["reason"] == "stopped during this row (SIGTERM)"
    assert second["reason"] == "not started: the run was stopped (SIGTERM)"
    (path,) = tmp_path.glob("unet-cpu-*.json")  # the checkpoint after each row
    assert json.loads(path.read_text())["skipped"] == record["skipped"]


def test_dpm_generation_only_where_asked(tmp_path):
    with pytest.raises(ValueError, match="generate_at"):
        _tiny_options(tmp_path, generate_at=(10,))
    opts = _tiny_options(tmp_path, seconds=(5, 10), steps=2, generate_at=(5,), scheduler="dpm++")
    assert opts.generates(5.04) is False or opts.generates(opts.seconds[0])
    assert opts.generates(opts.seconds[0]) and not opts.generates(opts.seconds[1])
    with pytest.raises(ValueError, match="scheduler"):
        _tiny_options(tmp_path, scheduler="euler")
    record = run_benchmark(_tiny_options(tmp_path, backends=("litefocus",), steps=2, scheduler="dpm++"))
    (row,) = record["rows"]
    assert row["scheduler"] == "dpm++" and row["steps"] == 2 and row["generate_s"] > 0
    assert "2 DPM++ steps + decode" in render_markdown(record)


def test_fp16_resolution_floor():
    # a random-weights vocoder in fp16: a ~1e-6 waveform, deep in fp16's subnormals (the H100 export)
    rng = np.random.default_rng(0)
    want = (rng.standard_normal(4096) * 1.7e-6).astype(np.float16)
    ulp = np.float16(2**-24)
    got = (want + ulp * rng.choice([-1, 0, 1], size=want.shape)).astype(np.float16)
    r = compare(got.astype(np.float32), want.astype(np.float32), np.float16)
    assert r["max_rel_rms"] > 0.02  # the relative tolerance alone would reject one ULP
    assert within_tolerance(r, 0.02)
    # a real error is still caught, in fp16 and fp32
    for dtype in (np.float16, np.float32):
        want = rng.standard_normal(4096).astype(dtype)
        got = want * (1 + 0.05 * rng.standard_normal(4096)).astype(dtype)
        r = compare(got.astype(np.float32), want.astype(np.float32), dtype)
        assert not within_tolerance(r, 0.02), dtype
    # and the fp32 floor is far below any tolerance in use
    assert compare(want.astype(np.float32), want.astype(np.float32))["resolution_abs"] < 1e-5


def test_git_state_keeps_the_first_changed_path(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci/run").write_text("a\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    (tmp_path / ".ci/run").write_text("b\n")
    monkeypatch.setattr(bench_run, "REPO", tmp_path)
    monkeypatch.delenv("LITEFOCUS_GIT_COMMIT", raising=False)
    state = bench_run.git_commit()
    assert state["dirty"] is True and state["changed"] == [".ci/run"]  # not "ci/run"
    monkeypatch.setenv("LITEFOCUS_GIT_COMMIT", "abc123")  # a copied tree: the caller names the commit
    assert bench_run.git_commit() == {"commit": "abc123", "dirty": None, "changed": None}


def test_compile_modes_are_told_apart_in_reports():
    row = {"backend": "litefocus-compile", "compile_mode": "reduce-overhead"}
    assert backend_label(row) == "litefocus-compile (reduce-overhead)"
    assert backend_label({"backend": "diffusers", "compile_mode": None}) == "diffusers"

    def record(mode, ms):
        r = {"backend": "diffusers-compile", "compile_mode": mode, "seconds": 80.0, "precision": "fp16"}
        return {"created": mode, "device": "gpu", "git": {}, "rows": [{**r, "step_ms_p50": ms}]}

    md = render_comparison([record("default", 46.5), record("reduce-overhead", 29.3)])
    assert "| 80 | diffusers-compile | fp16 | 46.5 | – |" in md
    assert "| 80 | diffusers-compile (reduce-overhead) | fp16 | – | 29.3 |" in md


def test_export_device_is_checked(capsys):
    from litefocus.export.cli import UsageError, _check_device

    assert _check_device("cpu") == "cpu"
    for bad in ("tpu", "cuda:x"):
        with pytest.raises(UsageError, match="--device"):
            _check_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU"):
            _check_device("cuda")


def test_io_binding_equals_the_plain_call_on_the_cpu_ep(tmp_path):
    """The IO-binding path (the GPU rows' timed call) against the session's plain run, on the CPU EP."""
    from litefocus.engine.backends import OnnxRuntimeBackend
    from litefocus.engine.contract import TensorSpec

    class Contract:
        module = "unet"
        inputs = (TensorSpec("x", (2, 3), "float32"), TensorSpec("i", (2,), "int32"))
        outputs = (TensorSpec("y", (2, 5), "float32"),)
        input_names, output_names = ["x", "i"], ["y"]

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 5)

        def forward(self, x, i):
            return self.lin(x) + i[:, None].float()

    path = tmp_path / "m.onnx"
    example = (torch.randn(2, 3), torch.tensor([1, 2], dtype=torch.int32))
    torch.onnx.export(
        M().eval(), example, str(path), input_names=["x", "i"], output_names=["y"], dynamo=False
    )
    backend = OnnxRuntimeBackend(path, Contract())
    rng = np.random.default_rng(3)
    binding = backend.bind()
    fixed_i = rng.integers(0, 9, 2).astype(np.int64)
    binding.set("i", fixed_i)  # cast to the graph's int32 once
    for _step in range(3):  # the runtime's pattern: one input bound once, another set every step
        x = rng.standard_normal((2, 3)).astype(np.float64)
        binding.set("x", x)
        binding.run()
        got = binding.output()
        want = backend({"x": x, "i": fixed_i})
        assert got.dtype == np.float32 and got.shape == (2, 5)
        np.testing.assert_array_equal(got, want)
        assert not np.array_equal(got, binding({"x": x + 1}))  # new input values do reach the graph
    with pytest.raises(ValueError, match=r"x: shape \(3, 2\), the contract says \(2, 3\)"):
        binding.set("x", np.zeros((3, 2)))
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.bind()


def test_phase_c_compares_the_gpu_form_in_one_process():
    from litefocus.bench.gpu_plan import PHASES, host_ms_per_step
    from litefocus.bench.report import backend_label
    from litefocus.bench.targets import unavailable_reason

    runs = {r.name: r.args for r in PHASES["C"].runs}
    assert "litefocus-compile" in runs["engine80"] and "reduce-overhead" in runs["engine80"]
    for (
        name,
        args,
    ) in runs.items():  # every run: eager diffusers (the ratio) and the engine with and without graphs
        assert {"diffusers", "onnxruntime", "onnxruntime-cudagraph"} <= set(args), name
    assert runs["ablation-none"][runs["ablation-none"].index("--gpu-ops") + 1] == "none"
    assert (
        unavailable_reason("onnxruntime-cudagraph", torch.device("cpu"))
        == "CUDA graphs need a CUDA GPU (--device cuda)"
    )
    row = {
        "backend": "onnxruntime-cudagraph",
        "gpu_ops": {"unet": ["nhwc", "bias_split_gelu"]},
        "compile_mode": None,
    }
    assert backend_label(row) == "onnxruntime-cudagraph [nhwc+bias_split_gelu]"
    assert host_ms_per_step({"steps": 25, "denoise_s": 0.5, "step_ms_p50": 15.0}) == "5.00"
    assert host_ms_per_step({"steps": 0, "denoise_s": None, "step_ms_p50": 15.0}) == "–"


def test_profile_engine_rehearses_on_the_cpu(tmp_path):
    """bench/gpu/profile_engine.py (run by run.sh C on the GPU) opens an engine through the runtime
    and writes its kernel table; on the CPU the same calls run (CPU time only)."""
    from litefocus.export import cli as export_cli

    engines = tmp_path / "engines"
    assert (
        export_cli.main(
            ["--seconds", "5", "--random-weights", "--preset", "tiny", "--out", str(engines), "-q"]
        )
        == 0
    )
    script = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "profile_engine.py"
    out = tmp_path / "out"
    args = ["--engines", str(engines), "--seconds", "5", "--device", "cpu", "--steps", "1", "--out", str(out)]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "profile-cpu-5s.json").read_text())
    assert record["entry"] == "5p12s-fp32" and record["gpu_ops"] == {"unet": [], "decode": []}
    assert record["unet"]["runs"] == 1 and record["unet"]["wall_ms_per_run"] > 0
    assert record["decode"]["wall_ms_per_run"] > 0
