"""Resident memory of one ONNX Runtime CPU session, by session option: the probe behind the arena and
decode-memory tables of bench/README.md ("Long audio").

    python -m litefocus.bench.probes.ort_memory ENGINE_DIR/80s-fp32/unet.onnx noarena
    python -m litefocus.bench.probes.ort_memory ENGINE_DIR/80s-fp32/decode.onnx decode-one-noarena

MODE is a label whose words switch options: noarena (enable_cpu_mem_arena off), noreuse
(enable_mem_reuse off: no buffer-reuse plan), samearena (the CPU arena as a process-wide
allocator growing by exactly the requests: kSameAsRequested), mallopt (glibc's mmap threshold fixed at 64 KiB before
anything loads, so freed buffers go back to the OS), noprepack,
nopattern (enable_mem_pattern off), t1 (one intra-op thread), memeff / prio (execution order),
basic (ORT_ENABLE_EXTENDED, no layout transforms), nonchwc (no NCHWc transformer), one (one run
instead of two), x3 / x5 (three / five). It prints one line: load time, resident memory after loading, each
run's time and peak resident set (VmHWM, reset before each run), and what stays resident after them.
The arena is on unless the mode says noarena.
Inputs are random (indices zero, masks one); run each mode in its own process.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np


def _mb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M).group(1)) // 1024


def random_feeds(session, seed: int = 0) -> dict:
    """Inputs for ``session`` from its own metadata: random floats, masks one, other ints (indices) zero."""
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32}
    types["tensor(int64)"] = np.int64
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        dt = types[i.type]
        if "mask" in i.name:
            feeds[i.name] = np.ones(i.shape, dt)
        elif dt in (np.float32, np.float16):
            feeds[i.name] = rng.standard_normal(i.shape).astype(dt)
        else:
            feeds[i.name] = np.zeros(i.shape, dt)
    return feeds


def probe(path: str, mode: str) -> str:
    if "mallopt" in mode:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if "noarena" in mode:
        so.enable_cpu_mem_arena = False
    if "samearena" in mode:
        cfg = ort.OrtArenaCfg({"arena_extend_strategy": 1})  # kSameAsRequested
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, cfg)
        so.add_session_config_entry("session.use_env_allocators", "1")
    if "noreuse" in mode:
        so.enable_mem_reuse = False
    if "noprepack" in mode:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if "nopattern" in mode:
        so.enable_mem_pattern = False
    if "t1" in mode:
        so.intra_op_num_threads = 1
    if "memeff" in mode:
        so.execution_order = ort.ExecutionOrder.MEMORY_EFFICIENT
    if "prio" in mode:
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if "basic" in mode:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    disabled = ["NchwcTransformer"] if "nonchwc" in mode else None
    t = time.time()
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    load = time.time() - t
    after_load, hwm_load = _mb("VmRSS"), _mb("VmHWM")
    feeds = random_feeds(s)
    runs = []
    for _ in range(1 if "one" in mode else 5 if "x5" in mode else 3 if "x3" in mode else 2):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS: each run's own peak
        t = time.time()
        s.run(None, feeds)
        runs.append(f"{time.time() - t:.1f}s/{_mb('VmHWM')}MB")
    return (
        f"{mode:24s} load {load:5.1f}s rss_after_load {after_load} MB hwm_load {hwm_load} MB | runs (time/peak) "
        f"{' '.join(runs)} | rss_end {_mb('VmRSS')} MB"
    )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m litefocus.bench.probes.ort_memory GRAPH.onnx MODE")
    print(probe(sys.argv[1], sys.argv[2]), flush=True)
