"""Step-level batching: requests that join and leave a running batch get the audio they get alone."""

import numpy as np
import pytest

from litefocus.engine import manifest as mf
from litefocus.export import cli as export_cli
from litefocus.runtime import GenerateOptions, Runtime
from litefocus.runtime.batching import BatchedUNet, decode_waveform, new_slot, pack
from tiny_models import T5_MAX_LENGTH, save_tiny_pipeline

SECONDS = 0.64


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    pipe = tmp_path_factory.mktemp("tiny-pipeline")
    save_tiny_pipeline(pipe)
    out = tmp_path_factory.mktemp("batched") / "engines"
    args = [
        "--seconds",
        str(SECONDS),
        "--model",
        str(pipe),
        "--out",
        str(out),
        "--text-len",
        str(T5_MAX_LENGTH),
    ]
    assert export_cli.main([*args, "--batch", "1", "2", "4", "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def rt(engines):
    with Runtime.load(engines, backend="onnxruntime") as runtime:
        yield runtime


def test_one_entry_per_batch_size(engines, rt):
    entries = mf.read_manifest(engines)["entries"]
    assert sorted(entries) == ["0p64s-fp32", "0p64s-fp32-b1", "0p64s-fp32-b4"]
    for name, batch in (("0p64s-fp32-b1", 1), ("0p64s-fp32", 2), ("0p64s-fp32-b4", 4)):
        inputs = {s["name"]: s["shape"] for s in entries[name]["modules"]["unet"]["contract"]["inputs"]}
        assert inputs["timestep"] == [batch] and inputs["litefocus_indices_f8"][0] == batch
        assert entries[name]["modules"]["decode"]["contract"]["batch"] == 1
    decode = {n: e["modules"]["decode"] for n, e in entries.items()}  # exported once, copied to the others
    assert len({(d["files"]["data"]["sha256"], d["export_seconds"]) for d in decode.values()}) == 1
    assert all(d["files"]["onnx"]["path"].startswith(f"{n}/") for n, d in decode.items())
    assert rt.bucket_for(SECONDS) == "0p64s-fp32"  # one guided request's engine
    assert sorted(rt.batch_group("0p64s-fp32-b4")) == [1, 2, 4]
    (bucket,) = rt.buckets()
    assert bucket == {"name": "0p64s-fp32", "seconds": pytest.approx(SECONDS), "batch_sizes": [1, 2, 4]}


REQUESTS = [  # (prompt, seconds, options, the step at which it joins the running batch)
    ("a dog barks", 0.64, GenerateOptions(steps=3, seed=1), 0),
    ("rain on a roof", 0.5, GenerateOptions(steps=4, seed=2, scheduler="dpm++"), 0),
    ("a dog barks", 0.3, GenerateOptions(steps=2, seed=3, guidance_scale=1.0), 1),
    ("wind", 0.64, GenerateOptions(steps=3, seed=4, negative_prompt="noise", guidance_scale=5.0), 2),
    ("birds", 0.6, GenerateOptions(steps=2, seed=5, guidance_scale=1.0), 2),
]


def test_batched_requests_equal_the_same_requests_alone(rt):
    """Mixed guidance (2 rows / 1 row), schedulers, step counts and lengths, joining at different
    steps and leaving when done: one UNet call per step for all, each result as alone (<= 1e-4)."""
    name = rt.bucket_for(SECONDS)
    group = rt.batch_group(name)
    unet = BatchedUNet(group)
    assert unet.capacity == 4
    waiting = [
        (p, sec, o, join, rt.text_encoder()(p, o.negative_prompt, guided=o.guided))
        for p, sec, o, join in REQUESTS
    ]
    active, done, step = [], {}, 0
    while waiting or active:
        for item in [w for w in waiting if w[3] <= step]:
            rows = sum(s.rows for s, _ in active)
            slot = new_slot(item[4], item[2], unet.contract, rt.schedule)
            if rows + slot.rows <= unet.capacity:  # joins at this step boundary
                active.append((slot, item))
                waiting.remove(item)
        calls = unet.stats["calls"]
        unet.step([s for s, _ in active])
        assert unet.stats["calls"] == calls + 1  # one UNet call for every active request
        for slot, item in [a for a in active if a[0].done]:
            done[item[2].seed] = decode_waveform(group[1].decode, slot.latents, item[1])
            active.remove((slot, item))
        step += 1
    for prompt, seconds, options, _ in REQUESTS:
        alone = rt.generate(prompt, seconds, options, progress=False)
        assert done[options.seed].shape == alone.waveform.shape == (int(seconds * 16000),)
        assert np.abs(alone.waveform).max() > 1e-3
        assert np.abs(done[options.seed] - alone.waveform).max() <= 1e-4, options
    used = sum((2 if o.guided else 1) * o.steps for _, _, o, _ in REQUESTS)
    assert unet.stats["rows_used"] == used <= unet.stats["rows_run"] <= 4 * unet.stats["calls"]


def test_without_batching_each_request_runs_alone(rt):
    group = rt.batch_group(rt.bucket_for(SECONDS))
    unet = BatchedUNet(group, batching=False)
    assert unet.capacity == 2
    cond = rt.text_encoder()("a dog barks", None, guided=True)
    slots = [new_slot(cond, GenerateOptions(steps=2, seed=s), unet.contract, rt.schedule) for s in (1, 2)]
    unet.step(slots)
    assert unet.stats == {"calls": 2, "rows_used": 4, "rows_run": 4}


def test_pack_is_greedy_within_the_largest_batch():
    class S:
        def __init__(self, rows):
            self.rows = rows

    slots = [S(2), S(1), S(2), S(2), S(1)]
    assert [[s.rows for s in c] for c in pack(slots, [1, 2, 4], True)] == [[2, 1], [2, 2], [1]]
    assert len(pack(slots, [1, 2, 4], False)) == 5


def test_a_request_is_one_prompt(rt):
    unet = BatchedUNet(rt.batch_group(rt.bucket_for(SECONDS)))
    guided = rt.text_encoder()("a dog barks", None, guided=True)
    with pytest.raises(ValueError, match="a request takes 1"):
        new_slot(guided, GenerateOptions(steps=2, guidance_scale=1.0), unet.contract, rt.schedule)
    with pytest.raises(ValueError, match="do not fit"):
        unet.size_for(5)


def test_a_denoiser_and_a_decoder_open_only_their_graphs(engines):
    with Runtime.load(engines, backend="onnxruntime") as rt:
        name = rt.bucket_for(SECONDS)
        group = rt.batch_group(name, modules=("unet",))
        assert all(e.unet is not None and e.decode is None for e in group.values())
        decoder = rt.open_entry(name, ("decode",))
        assert decoder.unet is None and decoder.decode is not None
        assert rt.open_entry(name).unet is group[2].unet  # each backend opened once
        with pytest.raises(ValueError, match="modules must name some of unet, decode"):
            rt.open_entry(name, ("vae",))


def test_a_long_lived_batch_never_reuses_a_finished_requests_conditioning(rt):
    """Requests join and leave one BatchedUNet for many steps (a serving denoiser's life): every
    call carries exactly its slots' own conditioning rows, also when a finished slot's memory (and
    id) goes to a new one."""
    import gc

    unet_c = rt.open_entry(rt.bucket_for(SECONDS)).unet_contract
    calls = []

    class Recorder:  # a UNet backend without IO binding that records its conditioning
        contract = unet_c

        def __call__(self, inputs):
            calls.append(inputs["encoder_hidden_states"].copy())
            return np.zeros(unet_c.shapes()["noise_pred"], np.float32)

    from litefocus.runtime.loader import OpenEntry
    from litefocus.runtime.options import Conditioning

    unet = BatchedUNet({2: OpenEntry(Recorder(), None, unet_c, None)})
    rng = np.random.default_rng()
    d, length = unet_c.gpt2_dim, unet_c.text_len
    for i in range(60):
        gpt2 = np.full((1, 8, d), float(i), np.float32)  # each request's rows are marked with its number
        cond = Conditioning(gpt2, rng.standard_normal((1, length, unet_c.t5_dim)), np.ones((1, length)))
        slot = new_slot(
            cond, GenerateOptions(steps=1 + i % 2, guidance_scale=1.0), unet.contract, rt.schedule
        )
        while not slot.done:
            unet.step([slot])
            assert calls[-1][0, 0, 0] == float(i)
        del slot, cond
        gc.collect()  # the finished slot's id is free for the next one
    assert len(calls) == sum(1 + i % 2 for i in range(60))


def test_conditioning_is_checked_against_the_engine(rt):
    from litefocus.runtime.options import Conditioning

    c = BatchedUNet(rt.batch_group(rt.bucket_for(SECONDS), modules=("unet",))).contract
    good = rt.text_encoder()("a dog barks", None, guided=True)
    options = GenerateOptions(steps=2)
    wrong_width = Conditioning(good.gpt2[:, :, :-1], good.t5, good.t5_mask)
    with pytest.raises(ValueError, match="this engine takes gpt2"):
        new_slot(wrong_width, options, c, rt.schedule)
    with pytest.raises(ValueError, match="NaN or infinity"):
        Conditioning(good.gpt2 * np.nan, good.t5, good.t5_mask)
    with pytest.raises(ValueError, match="only 0"):
        Conditioning(good.gpt2, good.t5, good.t5_mask * 7)
    assert new_slot(good, options, c, rt.schedule).rows == 2


def test_a_single_request_opens_only_the_engine_that_holds_it(engines, monkeypatch):
    import litefocus.runtime.runtime as runtime_module

    opened = []
    real = runtime_module.open_entry

    def recording(engine_dir, name, *args, **kwargs):
        opened.append(name)
        return real(engine_dir, name, *args, **kwargs)

    monkeypatch.setattr(runtime_module, "open_entry", recording)
    with Runtime.load(engines, backend="onnxruntime") as rt:
        rt.generate("a dog barks", SECONDS, steps=1, guidance_scale=1.0, progress=False)
        rt.generate("a dog barks", SECONDS, steps=1, progress=False)
        rt.generate("a dog barks", SECONDS, steps=1, progress=False)
        assert opened == ["0p64s-fp32-b1", "0p64s-fp32"]  # the batch-4 engine is never opened
        assert (
            rt.entry_for("0p64s-fp32", 2) == "0p64s-fp32" and rt.entry_for("0p64s-fp32", 1) == "0p64s-fp32-b1"
        )


def test_the_gpu_checks_provider_comparison_runs_every_fp32_graph_on_its_contracts_inputs(engines):
    """bench/gpu/provider_check.py (run on a lent GPU by batching_check.py) covers the text engine and
    each entry's UNet and decode; without a CUDA EP every variant falls back to the CPU EP, so the
    differences are ONNX Runtime's own optimization levels only, far inside the fp32 tolerances."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "gpu"))
    try:
        from provider_check import VARIANTS, compare_providers
    finally:
        sys.path.pop(0)
    rows = compare_providers(engines)
    entries = sorted(mf.read_manifest(engines)["entries"])
    graphs = ["text"] + [f"{e}/{m}" for e in entries for m in ("unet", "decode")]
    assert [(r["graph"], r["variant"]) for r in rows] == [(g, v) for g in graphs for v in VARIANTS]
    assert max(o["max_rel_rms"] for r in rows for o in r["outputs"].values()) < 1e-4
