"""The runtime and ``litefocus-generate`` against hostile input (issue 31, defects 5, 7 and 10):
every bad prompt, number, output path or signal is one line and a clean exit, never a traceback,
NaN audio, a replaced special file or a leftover temp file."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import soundfile as sf
from generate_helpers import cli_args

from litefocus.engine.fileio import atomic_path
from litefocus.export import cli as export_cli
from litefocus.runtime import Runtime
from litefocus.runtime import cli as generate_cli
from litefocus.runtime.options import Conditioning, GenerateOptions
from tiny_models import T5_MAX_LENGTH, save_tiny_pipeline

FAST = {"steps": 2, "progress": False}
SIGNAL_WAIT_S = 120  # bound on every wait for a child process


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """One 0.64 s bucket of the tiny pipeline (no LiteFocus: the cheapest export)."""
    root = tmp_path_factory.mktemp("hostile")
    save_tiny_pipeline(root / "pipe")
    args = ["--seconds", "0.64", "--model", str(root / "pipe"), "--out", str(root / "engines")]
    assert export_cli.main([*args, "--text-len", str(T5_MAX_LENGTH), "--no-litefocus", "-q"]) == 0
    return root / "engines"


@pytest.fixture(scope="module")
def rt(engines):
    with Runtime.load(engines, backend="onnxruntime") as runtime:
        yield runtime


@pytest.fixture
def rng(request):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")  # shown when the test fails
    return np.random.default_rng(seed)


def lone_surrogate(rng) -> str:
    return chr(int(rng.integers(0xD800, 0xE000)))


def one_line(err: str) -> str:
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip()]
    assert "Traceback" not in err, err
    return lines[-1]


# ---- prompts (defect 5) -----------------------------------------------------------------------------
def test_check_prompt(rng):
    from litefocus.runtime.inputs import MAX_PROMPT_CHARS, check_prompt

    ok = "rain on a tin roof " * int(rng.integers(1, 50))
    assert check_prompt(ok) == ok
    bad = [
        (3, "prompt must be a string, got int"),
        (b"dog", "prompt must be a string, got bytes"),
        ("dog " + lone_surrogate(rng), "prompt is not valid UTF-8"),
        ("dog\x00cat", "prompt contains a NUL character"),
        ("x" * (MAX_PROMPT_CHARS + int(rng.integers(1, 10**6))), f"more than the {MAX_PROMPT_CHARS} allowed"),
    ]
    for text, match in bad:
        with pytest.raises(ValueError, match=match) as e:
            check_prompt(text)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="negative_prompt is not valid UTF-8"):
        check_prompt(lone_surrogate(rng), "negative_prompt")


def test_surrogate_prompts_are_refused_by_the_api(rt, rng):
    with pytest.raises(ValueError, match="prompt is not valid UTF-8"):
        rt.generate("a dog " + lone_surrogate(rng), 0.5, seed=0, **FAST)
    with pytest.raises(ValueError, match="negative_prompt is not valid UTF-8"):
        rt.generate("a dog", 0.5, negative_prompt="cat" + lone_surrogate(rng), seed=0, **FAST)


def test_undecodable_argv_is_refused_by_the_cli(engines, tmp_path):
    out = tmp_path / "x.wav"
    for extra, prompt, field in [
        ((), b"a dog \xff", "prompt"),
        (("--negative-prompt", os.fsdecode(b"cat \xfe")), b"a dog", "--negative-prompt"),
    ]:
        args = [os.fsdecode(prompt) if i == 0 else a for i, a in enumerate(cli_args(engines, out, *extra))]
        # argv as the OS hands undecodable bytes to Python: surrogateescape (a lone surrogate)
        proc = subprocess.run(
            [sys.executable, "-m", "litefocus.runtime.cli", *args, "-q"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=SIGNAL_WAIT_S,
        )
        assert proc.returncode == 2, proc.stderr
        assert f"{field} is not valid UTF-8" in one_line(proc.stderr)
        assert not out.exists()


# ---- numbers (defect 5) -----------------------------------------------------------------------------
def test_guidance_is_bounded(rng):
    from litefocus.runtime.options import MAX_GUIDANCE

    GenerateOptions(guidance_scale=MAX_GUIDANCE)
    for g in (MAX_GUIDANCE * (1 + rng.random()) + 1e-9, 1e308, float(10 ** int(rng.integers(3, 308)))):
        with pytest.raises(ValueError, match="guidance_scale .* is above the maximum 100"):
            GenerateOptions(guidance_scale=g)
    # audit: an int past a float's range (JSON allows 4300 digits) was an OverflowError traceback
    with pytest.raises(ValueError, match="guidance_scale .* is above the maximum 100"):
        GenerateOptions(guidance_scale=10 ** int(rng.integers(309, 4000)))


def test_conditioning_values_are_bounded(rng):
    from litefocus.runtime.options import MAX_CONDITIONING

    gpt2 = rng.standard_normal((2, 8, 16)).astype(np.float32)
    t5 = rng.standard_normal((2, 4, 16)).astype(np.float32)
    mask = np.ones((2, 4), np.int32)
    Conditioning(gpt2, t5, mask)
    huge = float(rng.choice([3e38, MAX_CONDITIONING * (1 + rng.random()) + 1]))
    where = tuple(int(rng.integers(0, n)) for n in t5.shape)
    for name in ("gpt2", "t5"):
        bad = {"gpt2": gpt2.copy(), "t5": t5.copy()}
        bad[name][tuple(min(w, n - 1) for w, n in zip(where, bad[name].shape, strict=True))] = huge
        with pytest.raises(ValueError, match=rf"conditioning values \({name}\) contain a value of magnitude"):
            Conditioning(bad["gpt2"], bad["t5"], mask)
    with pytest.raises(ValueError, match="t5_mask must hold only 0"):
        Conditioning(gpt2, t5, np.full((2, 4), 2, np.int32))
    with pytest.raises(ValueError, match="must be a real number array"):
        Conditioning(gpt2, t5.astype(np.complex64), mask)


def test_huge_conditioning_never_reaches_the_engines(rt, rng):
    contract = rt.open_entry(rt.entry_for(rt.bucket_for(0.5), 2)).unet_contract
    gpt2 = rng.standard_normal((2, 8, contract.gpt2_dim)).astype(np.float32)
    t5 = rng.standard_normal((2, contract.text_len, contract.t5_dim)).astype(np.float32)
    t5[:, : int(rng.integers(1, contract.text_len + 1))] = 3e38  # finite, but overflows in attention
    with pytest.raises(ValueError, match=r"conditioning values \(t5\) contain a value of magnitude 3e\+38"):
        cond = Conditioning(gpt2, t5, np.ones((2, contract.text_len), np.int32))
        rt.generate_from_conditioning(cond, 0.5, seed=0, **FAST)


@pytest.mark.parametrize("seconds", [1e-300, 1 / 16000 / 2, 5e-324, 10**400])
def test_seconds_that_give_no_sample_or_overflow_are_refused(rt, seconds):
    match = "longer than the largest bucket" if seconds > 1 else "gives no audio sample at 16000 Hz"
    with pytest.raises(ValueError, match=match):
        rt.bucket_for(seconds)
    with pytest.raises(ValueError, match=match):
        rt.generate("a dog barks", seconds, seed=0, **FAST)


def test_one_sample_is_the_shortest_audio(rt):
    assert rt.generate("a dog barks", 1 / 16000, seed=0, **FAST).waveform.shape == (1,)


def nan_decode(monkeypatch):
    """Every opened entry's decode returns NaN (an overflow in the engines)."""
    real = Runtime.open_entry

    def open_entry(self, name, modules=("unet", "decode")):
        entry = real(self, name, modules)
        wave = np.full((1, 16000), np.nan, np.float32)
        return entry._replace(decode=lambda inputs: wave)

    monkeypatch.setattr(Runtime, "open_entry", open_entry)


def test_nan_audio_is_an_error_never_audio(engines, monkeypatch, tmp_path, capsys):
    nan_decode(monkeypatch)
    with Runtime.load(engines) as runtime, pytest.raises(RuntimeError, match="NaN/infinite values"):
        runtime.generate("a dog barks", 0.5, seed=0, **FAST)
    out = tmp_path / "nan.wav"
    assert generate_cli.main([*cli_args(engines, out), "-q"]) == 1
    assert "NaN/infinite values" in one_line(capsys.readouterr().err)
    assert not out.exists() and not list(tmp_path.iterdir())


# ---- output paths (defect 7) ------------------------------------------------------------------------
def test_fifo_output_is_refused_and_kept(engines, tmp_path, capsys):
    fifo = tmp_path / "out.wav"
    os.mkfifo(fifo)
    link = tmp_path / "link.wav"
    link.symlink_to(fifo)
    for out in (fifo, link):
        assert generate_cli.main([*cli_args(engines, out), "-q"]) == 2
        assert "is a FIFO (named pipe), not a regular file" in one_line(capsys.readouterr().err)
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink()


def test_output_inside_the_engine_directory_is_refused(engines, tmp_path, capsys, rng):
    """Audit: -o at an engine file or the manifest replaced it with a WAV (the engine was gone), and a
    new WAV beside them made the directory foreign to litefocus-export --force; also through a link."""
    before = {p: p.read_bytes() for p in engines.rglob("*") if p.is_file()}
    files = sorted(before)
    link = tmp_path / "engines-link"
    link.symlink_to(engines)
    picks = [files[int(rng.integers(len(files)))], engines / "manifest.json", engines / "new.wav"]
    for out in [*picks, link / "manifest.json"]:
        assert generate_cli.main([*cli_args(engines, out), "-q"]) == 2
        assert "is inside the engine directory" in one_line(capsys.readouterr().err)
    assert {p: p.read_bytes() for p in engines.rglob("*") if p.is_file()} == before


def test_an_output_name_near_the_length_limit_is_written(tmp_path, rng):
    """Audit: the temporary name (".<name>.<random>.tmp") of a 250-byte file name passed the 255-byte
    limit, so the WAV failed to write after the whole generation had run."""
    from litefocus.engine.fileio import atomic_write_bytes

    size = int(rng.integers(240, 256))
    out = tmp_path / ("é" * ((size - 4) // 2) + "a" * ((size - 4) % 2) + ".wav")
    assert len(os.fsencode(out.name)) == size
    data = rng.bytes(64)
    atomic_write_bytes(out, data)
    assert out.read_bytes() == data and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_special_files_are_never_replaced(tmp_path):
    from litefocus.engine.fileio import writable_target

    with pytest.raises(ValueError, match="/dev/null is a character device, not a regular file"):
        writable_target("/dev/null")  # only inspected: no test ever writes near a real device
    with pytest.raises(ValueError, match="is a directory, not a regular file"), atomic_path(tmp_path) as tmp:
        tmp.write_bytes(b"never")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="is a FIFO"), atomic_path(fifo) as tmp:
        tmp.write_bytes(b"never")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["fifo"]


def test_read_only_output_is_refused_and_kept(engines, tmp_path, capsys, rng):
    out = tmp_path / "ro.wav"
    data = rng.bytes(int(rng.integers(1, 100)))
    out.write_bytes(data)
    out.chmod(0o400)
    assert generate_cli.main([*cli_args(engines, out), "-q"]) == 2
    assert "is read-only (mode 0400)" in one_line(capsys.readouterr().err)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o400 and out.read_bytes() == data


@pytest.mark.parametrize("mode", [0o640, 0o666])
def test_existing_output_keeps_its_mode_and_symlink(engines, tmp_path, mode):
    real = tmp_path / "real.wav"
    real.write_bytes(b"old")
    real.chmod(mode)
    link = tmp_path / "link.wav"
    link.symlink_to(real.name)
    assert generate_cli.main([*cli_args(engines, link), "-q", "--seed", "1"]) == 0
    assert link.is_symlink() and sf.read(real)[0].shape == (8000,)
    assert stat.S_IMODE(os.stat(real).st_mode) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.wav", "real.wav"]  # no temp file left


# ---- signals (defect 10) ----------------------------------------------------------------------------
def start_long_generation(engines, out, err_path):
    """litefocus-generate with many steps, its progress bar on ``err_path``; returns once it denoises."""
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "litefocus.runtime.cli", *cli_args(engines, out, steps=999)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    deadline = time.monotonic() + SIGNAL_WAIT_S
    while "denoise" not in err_path.read_text(errors="replace"):
        assert proc.poll() is None, err_path.read_text()
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("litefocus-generate did not start denoising")
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize(
    "sig, code, word",
    [
        (signal.SIGINT, 130, "interrupted"),
        (signal.SIGTERM, 143, "terminated"),
        (signal.SIGHUP, 129, "terminated (SIGHUP)"),  # audit: the terminal closed; killed with the temp WAV
    ],
)
def test_signal_during_generation_exits_cleanly(engines, tmp_path, sig, code, word):
    out = tmp_path / "out.wav"
    proc = start_long_generation(engines, out, tmp_path / "err.txt")
    proc.send_signal(sig)
    try:
        assert proc.wait(SIGNAL_WAIT_S) == code
    finally:
        proc.kill()
    assert one_line((tmp_path / "err.txt").read_text()).startswith(f"litefocus-generate: {word}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["err.txt"]


def test_sigterm_while_writing_leaves_no_temp_file(engines, tmp_path):
    """SIGTERM arrives after the temp WAV is written and before the rename: it is removed."""
    out = tmp_path / "out.wav"
    script = textwrap.dedent(
        """
        import os, signal, sys
        import soundfile
        real = soundfile.write
        def write(*args, **kwargs):
            real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10**8):  # the handler runs at the next bytecode
                pass
        soundfile.write = write
        from litefocus.runtime import cli
        sys.exit(cli.main(sys.argv[1:]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *cli_args(engines, out), "-q"],
        capture_output=True,
        text=True,
        timeout=SIGNAL_WAIT_S,
    )
    assert proc.returncode == 143, proc.stderr
    assert one_line(proc.stderr).startswith("litefocus-generate: terminated (SIGTERM)")
    assert not list(tmp_path.iterdir())


# ---- closing a runtime that is in use (defect 10) ---------------------------------------------------
class SlowUNet:
    """The real UNet backend, a little slower per step; tells when the first step runs."""

    def __init__(self, inner):
        self.inner, self.contract, self.started = inner, inner.contract, threading.Event()

    def __call__(self, inputs):
        self.started.set()
        time.sleep(0.01)
        return self.inner(inputs)

    def close(self):
        self.inner.close()


def test_close_during_generation(engines):
    runtime = Runtime.load(engines, backend="onnxruntime")
    name = runtime.entry_for(runtime.bucket_for(0.5), 2)
    runtime.open_entry(name)
    slow = SlowUNet(runtime._backends[(name, "unet")])
    runtime._backends[(name, "unet")] = slow
    result = {}

    def worker():
        try:
            result["audio"] = runtime.generate("a dog barks", 0.5, seed=3, steps=30, progress=False)
        except Exception as e:  # the test reports it below
            result["error"] = e

    thread = threading.Thread(target=worker)
    thread.start()
    assert slow.started.wait(SIGNAL_WAIT_S)
    runtime.close()  # waits for the running generation, then releases the engines
    thread.join(SIGNAL_WAIT_S)
    assert "error" not in result, repr(result.get("error"))
    assert result["audio"].waveform.shape == (8000,) and np.isfinite(result["audio"].waveform).all()
    for call in (
        lambda: runtime.generate("a dog barks", 0.5, seed=3, **FAST),
        lambda: runtime.open_entry(name),
        runtime.text_encoder,
    ):
        with pytest.raises(RuntimeError, match="the runtime was closed; load it again"):
            call()
    runtime.close()  # idempotent


def test_close_while_a_generation_encodes_its_prompt(engines):
    """close() waits; the generation goes on to open its engines (nothing opened yet) and finishes."""
    runtime = Runtime.load(engines, backend="onnxruntime")
    encoder, entered, release = runtime.text_encoder(), threading.Event(), threading.Event()

    def paused_encoder(*args, **kwargs):
        entered.set()
        assert release.wait(SIGNAL_WAIT_S)
        return encoder(*args, **kwargs)

    cond = encoder("a dog barks", None, guided=True)  # for the call after close(), which closes the encoder
    runtime.text_encoder = lambda: paused_encoder
    result = {}

    def worker():
        try:
            result["audio"] = runtime.generate("a dog barks", 0.5, seed=3, **FAST)
        except Exception as e:  # the test reports it below
            result["error"] = e

    threads = [threading.Thread(target=worker), threading.Thread(target=runtime.close)]
    threads[0].start()
    assert entered.wait(SIGNAL_WAIT_S)
    threads[1].start()
    time.sleep(0.2)
    assert threads[1].is_alive()  # close() waits for the running generation
    release.set()
    for t in threads:
        t.join(SIGNAL_WAIT_S)
    assert "error" not in result, repr(result.get("error"))
    assert result["audio"].waveform.shape == (8000,)
    with pytest.raises(RuntimeError, match="the runtime was closed"):
        runtime.generate_from_conditioning(cond, 0.5, **FAST)


def test_engines_taken_from_a_closed_runtime_are_closed(engines):
    """Audit: the text encoder taken from a runtime kept running (and holding its session) after
    Runtime.close(); every engine handed out is closed with it."""
    runtime = Runtime.load(engines, backend="onnxruntime")
    encoder, entry = runtime.text_encoder(), runtime.open_entry(runtime.bucket_for(0.5))
    runtime.close()
    with pytest.raises(RuntimeError, match="closed"):
        encoder("a dog barks")
    with pytest.raises(RuntimeError, match="closed"):
        entry.unet({})
    with pytest.raises(RuntimeError, match="the runtime was closed"):
        runtime.generate("a dog barks", 0.5, **FAST)


def test_a_closed_stdout_is_no_traceback(engines, tmp_path):
    """Audit: with stdout closed early (``litefocus-generate ... | head -c0``), the final line was a
    BrokenPipeError traceback and exit 1 although the WAV was written; it exits 0 quietly."""
    out = tmp_path / f"{os.urandom(4).hex()}.wav"
    args = [sys.executable, "-m", "litefocus.runtime.cli", *cli_args(engines, out), "-q"]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # the reader is gone before the line is printed
    err = child.stderr.read().decode()
    assert child.wait(SIGNAL_WAIT_S) == 0, err[-2000:]
    assert "Traceback" not in err and "BrokenPipe" not in err, err[-2000:]
    assert out.stat().st_size > 44
