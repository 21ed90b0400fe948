"""litefocus.runtime.audio: the Audio record and write_wav (16-bit PCM or 32-bit float WAV, written
through a temporary file and a rename), read back with soundfile."""

from __future__ import annotations

import dataclasses
import os
import random

import numpy as np
import pytest
import soundfile as sf

from litefocus.runtime.audio import Audio, write_wav


def _audio(samples: int | None = None, rate: int | None = None, amplitude: float = 0.9) -> Audio:
    samples = samples or random.randint(100, 20_000)
    rate = rate or random.choice([8000, 16000, 44100])
    wave = np.random.default_rng().uniform(-amplitude, amplitude, samples).astype(np.float32)
    return Audio(wave, rate, samples / rate, "1p28s-fp32", seed=random.randrange(2**63))


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_float32_wav_round_trips_exactly(tmp_path):
    audio = _audio()
    out = write_wav(tmp_path / "a.wav", audio, float32=True)
    assert out == tmp_path / "a.wav"
    info = sf.info(out)
    assert (info.samplerate, info.subtype, info.format, info.frames) == (
        audio.sample_rate,
        "FLOAT",
        "WAV",
        len(audio.waveform),
    )
    back, rate = sf.read(out, dtype="float32")
    assert rate == audio.sample_rate
    np.testing.assert_array_equal(back, audio.waveform)


def test_the_default_is_16_bit_pcm_within_one_step(tmp_path):
    audio = _audio()
    out = write_wav(str(tmp_path / "b.wav"), audio)  # a str path works too
    info = sf.info(out)
    assert (info.samplerate, info.subtype, info.frames) == (audio.sample_rate, "PCM_16", len(audio.waveform))
    pcm, _ = sf.read(out, dtype="int16")
    np.testing.assert_allclose(pcm, audio.waveform.astype(np.float64) * 32768, rtol=0, atol=1)  # one step
    back, _ = sf.read(out, dtype="float32")
    np.testing.assert_allclose(back, audio.waveform, rtol=0, atol=1.001 / 32768)
    assert not np.array_equal(back, audio.waveform)  # quantized: not the float samples
    assert os.path.getsize(out) < 2 * len(audio.waveform) + 1000  # two bytes per sample


def test_an_existing_file_is_replaced_whole_and_nothing_is_left_beside_it(tmp_path):
    path = tmp_path / "c.wav"
    path.write_bytes(os.urandom(random.randint(1, 10_000)))
    audio = _audio()
    write_wav(path, audio, float32=True)
    np.testing.assert_array_equal(sf.read(path, dtype="float32")[0], audio.waveform)
    assert _leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "d.wav"
    old = _audio()
    write_wav(path, old)
    before = path.read_bytes()
    broken = dataclasses.replace(old, waveform=np.array(["not", "audio"], dtype=object))
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        write_wav(path, broken)
    assert path.read_bytes() == before and _leftovers(tmp_path) == []


def test_a_missing_directory_is_a_one_line_error_naming_it(tmp_path):
    missing = tmp_path / f"no-{random.randrange(10**6)}"
    with pytest.raises(ValueError) as e:
        write_wav(missing / "e.wav", _audio())
    assert str(missing) in str(e.value) and "does not exist" in str(e.value) and "\n" not in str(e.value)
    assert not missing.exists()


def test_a_directory_at_the_path_is_refused(tmp_path):
    folder = tmp_path / "f.wav"
    folder.mkdir()
    with pytest.raises(ValueError, match="directory"):
        write_wav(folder, _audio())
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_audio_is_frozen_and_each_gets_its_own_timings():
    a, b = _audio(), _audio()
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.seed = 1  # type: ignore[misc]
    a.timings["denoise"] = random.random()
    assert b.timings == {} and Audio(a.waveform, 16000, 1.0, "x").seed is None
