"""The runtime against diffusers' own AudioLDM2Pipeline, across backends, threads and bad input."""

import json
import shutil
import threading
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from generate_helpers import cli_args

from litefocus.export import cli as export_cli
from litefocus.runtime import Runtime
from litefocus.runtime import cli as generate_cli
from tiny_models import T5_MAX_LENGTH, save_tiny_pipeline

PROMPT = "a dog barks"
SECONDS = 0.64  # 16 latent frames: diffusers' own geometry equals the bucket's (no padding)
FAST = {"steps": 3, "progress": False}


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-pipeline")
    save_tiny_pipeline(path)
    return path


def _export(pipe_dir, out, *extra, seconds=SECONDS):
    args = [
        "--seconds",
        str(seconds),
        "--model",
        str(pipe_dir),
        "--out",
        str(out),
        "--text-len",
        str(T5_MAX_LENGTH),
    ]
    assert export_cli.main([*args, *extra, "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def engines_off(pipe_dir, tmp_path_factory):
    return _export(pipe_dir, tmp_path_factory.mktemp("off") / "engines", "--no-litefocus")


@pytest.fixture(scope="module")
def engines_on(pipe_dir, tmp_path_factory):
    out = _export(pipe_dir, tmp_path_factory.mktemp("on") / "engines")
    return _export(pipe_dir, out, seconds=10)  # a second, longer bucket in the same directory


@pytest.fixture(scope="module")
def runtime_on(engines_on):
    with Runtime.load(engines_on, backend="onnxruntime") as rt:
        yield rt


def initial_latents(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 8, 16, 16), dtype=np.float32)  # [1, 8, T, F]


def diffusers_audio(pipe_dir, latents, steps, scheduler=None, negative_prompt=None):
    from diffusers import AudioLDM2Pipeline

    pipe = AudioLDM2Pipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(
            PROMPT,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            audio_length_in_s=SECONDS,
            latents=torch.from_numpy(latents),
        )
    return out.audios[0]


@pytest.mark.parametrize(
    "scheduler, steps, negative",
    [("ddim", 3, None), ("dpm++", 4, None), ("ddim", 2, "a loud cat meows in the rain at night")],
)
def test_torch_free_runtime_matches_diffusers_pipeline(pipe_dir, engines_off, scheduler, steps, negative):
    """LiteFocus off: same prompt and initial latents -> diffusers' AudioLDM2Pipeline's waveform."""
    from diffusers import DPMSolverMultistepScheduler

    latents = initial_latents(steps)
    want = diffusers_audio(
        pipe_dir, latents, steps, DPMSolverMultistepScheduler if scheduler == "dpm++" else None, negative
    )
    opts = {"steps": steps, "scheduler": scheduler, "negative_prompt": negative, "progress": False}
    with Runtime.load(engines_off) as rt:
        audio = rt.generate(PROMPT, SECONDS, latents=latents, **opts)
        other = rt.generate(PROMPT, SECONDS, latents=initial_latents(99), **opts)
    assert audio.waveform.shape == want.shape == (int(SECONDS * 16000),)
    assert np.abs(want).max() > 1e-3
    assert np.abs(audio.waveform - want).max() <= 1e-4
    assert np.abs(other.waveform - want).max() > 1e-3  # the comparison can fail: other latents, other audio


def torch_reference(pipe_dir, engines, name):
    """The PyTorch reference of an entry (LiteFocus processors + UNetExportModule, DecodeModule),
    as the runtime's backends: the twin of the exported graphs."""
    import litefocus
    from litefocus.export.decode import DecodeModule
    from litefocus.export.onnx_export import UNetExportModule
    from litefocus.export.torch_backend import TorchBackend
    from litefocus.models import load_components
    from litefocus.runtime.loader import OpenEntry

    with Runtime.load(engines) as rt:
        _, _, unet_c, decode_c = rt.open_entry(name)
        config = rt.config
    unet, vae, vocoder = load_components(str(pipe_dir))
    handle = litefocus.install(unet, config) if config is not None else None
    return OpenEntry(
        TorchBackend(UNetExportModule(unet, unet_c, handle), unet_c),
        TorchBackend(DecodeModule.for_contract(vae, vocoder, decode_c), decode_c),
        unet_c,
        decode_c,
    )


def test_onnxruntime_matches_torch_with_litefocus(pipe_dir, engines_on, runtime_on):
    from litefocus.runtime import GenerateOptions
    from litefocus.runtime.runtime import generate_audio

    name = runtime_on.bucket_for(SECONDS)
    options = GenerateOptions(steps=3, seed=5)
    cond = runtime_on.text_encoder()(PROMPT, None, guided=True)
    ref = torch_reference(pipe_dir, engines_on, name)
    want = generate_audio(ref, cond, SECONDS, options, runtime_on.schedule, progress=False).waveform
    got = runtime_on.generate(PROMPT, SECONDS, options, progress=False).waveform
    assert np.abs(want).max() > 1e-3
    assert np.abs(got - want).max() <= 1e-4


def test_io_binding_loop_equals_the_plain_calls(runtime_on):
    """The runtime's IO-binding path (what a GPU runs) against plain session.run calls, bit for bit."""
    from litefocus.runtime import GenerateOptions
    from litefocus.runtime.loader import OpenEntry
    from litefocus.runtime.runtime import generate_audio

    name = runtime_on.bucket_for(SECONDS)
    unet, decode, unet_c, decode_c = runtime_on.open_entry(name)

    class Plain:  # no .bind: plain session.run() calls
        contract = unet_c

        def __call__(self, inputs):
            return unet(inputs)

    plain = OpenEntry(Plain(), decode, unet_c, decode_c)
    cond = runtime_on.text_encoder()(PROMPT, None, guided=True)
    options = GenerateOptions(steps=3, seed=6)
    a = generate_audio(
        runtime_on.open_entry(name), cond, SECONDS, options, runtime_on.schedule, progress=False
    )
    b = generate_audio(plain, cond, SECONDS, options, runtime_on.schedule, progress=False)
    assert np.abs(a.waveform).max() > 1e-3 and np.array_equal(a.waveform, b.waveform)


def test_litefocus_changes_the_audio(engines_on, engines_off, runtime_on):
    with Runtime.load(engines_off) as rt:
        off = rt.generate(PROMPT, SECONDS, seed=5, **FAST).waveform
    assert np.abs(runtime_on.generate(PROMPT, SECONDS, seed=5, **FAST).waveform - off).max() > 1e-4


def test_seeds(runtime_on):
    a = runtime_on.generate(PROMPT, SECONDS, seed=7, **FAST)
    b = runtime_on.generate(PROMPT, SECONDS, seed=7, **FAST)
    c = runtime_on.generate(PROMPT, SECONDS, seed=8, **FAST)
    assert np.array_equal(a.waveform, b.waveform)
    assert np.abs(a.waveform - c.waveform).max() > 1e-4
    assert a.bucket == "0p64s-fp32" and a.sample_rate == 16000 and a.waveform.dtype == np.float32
    assert set(a.timings) >= {"conditioning", "denoise", "decode"}
    assert a.seed == 7
    drawn = runtime_on.generate(PROMPT, SECONDS, **FAST)  # no seed: one is drawn and returned
    assert isinstance(drawn.seed, int) and 0 <= drawn.seed < 2**63
    again = runtime_on.generate(PROMPT, SECONDS, seed=drawn.seed, **FAST)
    assert np.array_equal(drawn.waveform, again.waveform)


def test_crops_to_exact_length_on_a_longer_bucket(runtime_on):
    audio = runtime_on.generate(PROMPT, 7, seed=0, steps=2, progress=False)
    assert audio.bucket == "10p24s-fp32"
    assert audio.waveform.shape == (112000,)


def test_threads_get_the_audio_they_would_get_alone(engines_on):
    """Requests on two buckets at once, three threads: each gets what it would get alone."""
    rt = Runtime.load(engines_on)
    jobs = [(s, SECONDS if s % 2 else 1.0) for s in (11, 12, 13, 14, 15, 16)]
    alone = {s: rt.generate(PROMPT, sec, seed=s, steps=2, progress=False).waveform for s, sec in jobs}
    got, errors = {}, []

    def worker(mine):
        try:
            for s, sec in mine:
                got[s] = rt.generate(PROMPT, sec, seed=s, steps=2, progress=False).waveform
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(jobs[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rt.close()
    assert not errors
    assert all(np.array_equal(got[s], alone[s]) for s, _ in jobs)


def test_guidance_scale_one_runs_unguided(runtime_on):
    a = runtime_on.generate(PROMPT, SECONDS, seed=4, guidance_scale=1.0, **FAST).waveform
    b = runtime_on.generate(PROMPT, SECONDS, seed=4, guidance_scale=3.5, **FAST).waveform
    assert np.isfinite(a).all() and np.abs(a - b).max() > 1e-4


def test_loading_twice_in_one_process(engines_on):
    with Runtime.load(engines_on) as a, Runtime.load(engines_on) as b:
        assert np.array_equal(
            a.generate(PROMPT, SECONDS, seed=2, **FAST).waveform,
            b.generate(PROMPT, SECONDS, seed=2, **FAST).waveform,
        )


def test_long_prompt_is_truncated_with_a_warning(runtime_on, caplog):
    long = " ".join(["dog barks"] * 20)
    with caplog.at_level("WARNING"):
        runtime_on.generate(long, SECONDS, seed=0, **FAST)
    assert "truncated" in caplog.text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": ""}, "prompt must be a non-empty string"),
        ({"prompt": 3}, "prompt must be a non-empty string"),
        ({"seconds": 0}, "seconds must be a positive finite number"),
        ({"seconds": float("nan")}, "seconds must be a positive finite number"),
        ({"seconds": 30}, r"longer than the largest bucket .*0.64 s, 10.24 s.*litefocus-export --seconds 30"),
        ({"steps": 0}, "steps must be an int >= 1"),
        ({"guidance_scale": 0.5}, "guidance_scale must be a number >= 1"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a number >= 1"),
        ({"scheduler": "euler"}, "unknown scheduler 'euler'"),
        ({"seed": -1}, r"seed must be an int in \[0, 2\*\*63\)"),
        ({"latents": np.zeros((1, 8, 24, 16), np.float32)}, r"latents have shape \[1, 8, 24, 16\]; bucket"),
        ({"latents": np.full((1, 8, 16, 16), np.nan, np.float32)}, "latents contain NaN"),
        ({"stepz": 3}, "unknown option.*stepz.*GenerateOptions has steps"),
        (
            {"negative_prompt": "a cat", "guidance_scale": 1.0},
            "negative_prompt 'a cat' has no effect at guidance_scale 1",
        ),
        ({"scheduler": "dpm++", "steps": 1000}, "steps = 1000 repeats timesteps in DPM-Solver"),
    ],
)
def test_bad_generate_arguments(runtime_on, kwargs, match):
    args = {"prompt": PROMPT, "seconds": SECONDS, **kwargs}
    with pytest.raises(ValueError, match=match):
        runtime_on.generate(args.pop("prompt"), args.pop("seconds"), progress=False, **args)


def test_a_latents_error_names_the_entry(runtime_on):
    name = runtime_on.bucket_for(SECONDS)
    with pytest.raises(ValueError, match=rf"latents have shape \[1, 8, 24, 16\]; bucket {name} takes"):
        runtime_on.generate(PROMPT, SECONDS, progress=False, latents=np.zeros((1, 8, 24, 16), np.float32))


def test_bad_engine_directories(engines_on, tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'"):
        Runtime.load(engines_on, backend="tensorflow")
    with pytest.raises(ValueError, match="does not exist"):
        Runtime.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="not an engine directory"):
        Runtime.load(tmp_path)
    bad = tmp_path / "schema"
    shutil.copytree(engines_on, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema version 99"):
        Runtime.load(bad)


@pytest.mark.parametrize("damage", ["flip", "missing"])
def test_tampered_engine_file_is_refused(engines_on, tmp_path, damage):
    copy = tmp_path / "engines"
    shutil.copytree(engines_on, copy)
    target = copy / "0p64s-fp32" / "unet.onnx.data"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    with Runtime.load(copy) as rt, pytest.raises(ValueError, match="failed verification.*unet.onnx.data"):
        rt.generate(PROMPT, SECONDS, seed=0, **FAST)


def test_random_weight_engines_have_no_text_encoders(engines_on, tmp_path):
    copy = tmp_path / "engines"
    shutil.copytree(engines_on, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model"]["source"] = "random:audioldm2:0"
    del manifest["text"]  # what a --random-weights export writes: no text engine
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with Runtime.load(copy) as rt, pytest.raises(ValueError, match="generate_from_conditioning"):
        rt.generate(PROMPT, SECONDS, seed=0, **FAST)


def run_cli(engines, out, *extra):
    return generate_cli.main(cli_args(engines, out, "-q", *extra, prompt=PROMPT))


def test_generate_cli_writes_a_wav(engines_on, tmp_path, capsys):
    out = tmp_path / "dog.wav"
    assert run_cli(engines_on, out, "--seed", "3") == 0
    data, rate = sf.read(out)
    assert rate == 16000 and data.shape == (8000,) and sf.info(out).subtype == "PCM_16"
    assert "0p64s-fp32" in capsys.readouterr().out
    assert run_cli(engines_on, out, "--float") == 0
    assert sf.info(out).subtype == "FLOAT"
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("where, match", [("missing-dir", "does not exist"), ("a-dir", "is a directory")])
def test_generate_cli_bad_output_path(engines_on, tmp_path, capsys, where, match):
    out = tmp_path / "no" / "x.wav" if where == "missing-dir" else tmp_path
    assert run_cli(engines_on, out) == 2
    assert match in capsys.readouterr().err


def test_tensorrt_backend_without_tensorrt(engines_on, monkeypatch, capsys, tmp_path):
    from litefocus.engine.tensorrt_backend import TensorRTNotInstalled

    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    with pytest.raises(TensorRTNotInstalled, match="pip install"):
        Runtime.load(engines_on, backend="tensorrt")
    assert run_cli(engines_on, tmp_path / "x.wav", "--backend", "tensorrt") == 2
    assert "pip install" in capsys.readouterr().err


def test_auto_backend_uses_onnxruntime_without_tensorrt_engines(engines_on):
    with Runtime.load(engines_on) as rt:
        name = rt.bucket_for(SECONDS)
        from litefocus.runtime.loader import choose_run_backend

        assert choose_run_backend(rt.backend, rt.entries[name], rt.device) == "onnxruntime"


def test_open_entry_by_name(runtime_on):
    name = next(iter(runtime_on.entries))
    unet, decode, unet_c, decode_c = runtime_on.open_entry(name)
    assert unet.name == "onnxruntime" and unet.session.get_providers()[0] == "CPUExecutionProvider"
    assert unet_c.bucket.frames == runtime_on.entries[name].bucket.frames == decode_c.bucket.frames
    assert runtime_on.open_entry(name)[0] is unet  # opened once
    with pytest.raises(ValueError, match=r"no entry '99s-fp16'; it has"):
        runtime_on.open_entry("99s-fp16")


def test_fp32_graphs_run_without_tf32_on_the_cuda_ep(monkeypatch):
    """ONNX Runtime's CUDA EP computes fp32 in TF32 by default (measured on an H200: a tiny fp32 UNet
    failed validation at 1.3e-3 of its RMS): fp32 graphs ask for use_tf32=0, fp16 ones keep it."""
    import onnxruntime as ort

    from litefocus.engine.backends import onnxruntime_providers

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    fp32 = onnxruntime_providers(device_id=1, precision="fp32")
    assert fp32 == [("CUDAExecutionProvider", {"device_id": 1, "use_tf32": 0}), "CPUExecutionProvider"]
    assert onnxruntime_providers(precision="fp16")[0] == ("CUDAExecutionProvider", {"device_id": 0})
    assert onnxruntime_providers(prefer_cuda=False) == ["CPUExecutionProvider"]


@pytest.mark.parametrize(("device", "ort_device", "cuda"), [("cpu", None, False), ("cpu", "cuda:1", True)])
def test_validation_runs_onnx_runtime_on_the_exports_device(monkeypatch, device, ort_device, cuda):
    """``--device cpu`` validates on the CPU EP even where a CUDA EP is installed (it took the CUDA EP,
    and a GPU machine's export then failed on fused kernels it was not asked to run); the text engine,
    traced on the CPU, is validated on the export's device through ``ort_device``."""
    import onnxruntime as ort
    import torch

    from litefocus.export import validate as validate_mod

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    seen = []

    def fake_open(path, providers, module):
        seen.append(providers)
        raise RuntimeError("stop here")

    monkeypatch.setattr(validate_mod, "open_session", fake_open)
    contract = type(
        "C", (), {"precision": "fp32", "module": "unet", "sample_inputs": lambda self, seed: {}}
    )()
    with pytest.raises(RuntimeError, match="stop here"):
        validate_mod.validate("g.onnx", torch.nn.Identity(), contract, device=device, ort_device=ort_device)
    want = [("CUDAExecutionProvider", {"device_id": 1, "use_tf32": 0}), "CPUExecutionProvider"]
    assert seen == [want if cuda else ["CPUExecutionProvider"]]
