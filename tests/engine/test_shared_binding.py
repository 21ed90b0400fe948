"""CUDA-graph sessions share one set of device buffers between requests (``SharedBinding``).

A captured CUDA graph replays against the addresses it was captured with, so every request of a
UNet session writes its inputs into the same buffers. The bookkeeping (which request's inputs are in
the buffers, what to copy again) is device-independent: it is tested here on the CPU EP, the same
``Binding`` the CUDA EP uses.
"""

import threading
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from litefocus.engine.backends import Binding, SharedBinding
from litefocus.engine.contract import TensorSpec

SHAPE = (2, 3)


def _session_and_contract():
    # out = sample + 2 * cond
    nodes = [
        helper.make_node("Mul", ["cond", "two"], ["c2"]),
        helper.make_node("Add", ["sample", "c2"], ["out"]),
    ]
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    values = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, list(SHAPE)) for n in ("sample", "cond", "out")
    ]
    graph = helper.make_graph(nodes, "g", values[:2], values[2:], [two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    contract = SimpleNamespace(
        module="unet",
        inputs=(TensorSpec("sample", SHAPE, "float32"), TensorSpec("cond", SHAPE, "float32")),
        outputs=(TensorSpec("out", SHAPE, "float32"),),
    )
    return session, contract


class CountingBinding(Binding):
    def __init__(self, *args):
        super().__init__(*args)
        self.copies = []

    def set(self, name, array):
        self.copies.append(name)
        super().set(name, array)


def test_requests_sharing_the_buffers_each_get_their_own_output():
    session, contract = _session_and_contract()
    shared = CountingBinding(session, contract, ("cpu", 0))
    lock = threading.Lock()
    a, b = SharedBinding(shared, lock, contract), SharedBinding(shared, lock, contract)
    rng = np.random.default_rng(0)
    cond_a, cond_b = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    a.set("cond", cond_a)
    b.set("cond", cond_b)
    for _ in range(3):  # interleaved steps: each step of one request follows a step of the other
        xa, xb = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
        a.set("sample", xa)
        b.set("sample", xb)
        a.run()
        b.run()
        np.testing.assert_allclose(a.output(), xa + 2 * cond_a, atol=1e-5)
        np.testing.assert_allclose(b.output(), xb + 2 * cond_b, atol=1e-5)
    # interleaved, each run re-copies the conditioning the other request overwrote
    assert shared.copies.count("cond") == 6


def test_a_request_alone_copies_its_conditioning_once():
    session, contract = _session_and_contract()
    shared = CountingBinding(session, contract, ("cpu", 0))
    alone = SharedBinding(shared, threading.Lock(), contract)
    cond = np.ones(SHAPE)
    alone.set("cond", cond)
    for step in range(4):
        alone.set("sample", np.full(SHAPE, float(step)))
        alone.run()
        np.testing.assert_allclose(alone.output(), step + 2 * cond)
    assert shared.copies == ["cond", "sample", "sample", "sample", "sample"]
    alone.set("cond", 3 * cond)  # a new value of the same input is copied again
    alone.run()
    np.testing.assert_allclose(alone.output(), 3 + 6 * cond)


def test_threads_through_one_shared_binding_get_their_own_outputs():
    session, contract = _session_and_contract()
    shared, lock = Binding(session, contract, ("cpu", 0)), threading.Lock()
    errors = []

    def request(seed: int) -> None:
        view, rng = SharedBinding(shared, lock, contract), np.random.default_rng(seed)
        cond = rng.standard_normal(SHAPE)
        view.set("cond", cond)
        for _ in range(50):
            x = rng.standard_normal(SHAPE)
            got = view({"sample": x})
            if not np.allclose(got, x + 2 * cond, atol=1e-5):
                errors.append(seed)

    threads = [threading.Thread(target=request, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
