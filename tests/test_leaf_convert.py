"""The leaf's feature -> tensor conversion, in process (no torch model needed)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from leaf.convert import Converter, output_to_wire
from trimmer.codec import decode_request, encode_msgpack
from trimmer.errors import PayloadError
from trimmer.signature import parse_signature
from trimmer.tensor import Tensor

SIG = parse_signature(b"""{"input_names": ["user_dense", "user_age", "cand_ctr", "cand_emb", "cand_price"],
  "output_names": ["score"],
  "inputs": {"user_dense": {"dtype": "float32", "shape": [4], "default": 0.0},
             "user_age": {"dtype": "float32", "shape": [], "default": 30.0},
             "cand_ctr": {"dtype": "float32", "shape": [-1]},
             "cand_emb": {"dtype": "float32", "shape": [-1, 2]},
             "cand_price": {"dtype": "int32", "shape": [-1], "default": 7}}}""")


def received(features: dict) -> dict:
    """Features as the leaf sees them: decoded from a msgpack body (tensor data = read-only memoryview)."""
    return decode_request(encode_msgpack({"features": features}), "application/msgpack")["features"]


def test_typed_tensors_are_wrapped_without_copy_and_without_warning():
    ctr = np.arange(3, dtype=np.float32)
    feats = received({"cand_ctr": Tensor.from_numpy(ctr), "cand_emb": Tensor.from_numpy(np.ones((3, 2), np.float32))})
    mv = feats["cand_ctr"].data
    assert isinstance(mv, memoryview) and mv.readonly
    with warnings.catch_warnings(record=True) as caught:  # keeps the leaf's filter for this known warning
        conv = Converter(SIG).convert(feats)
    assert not [w for w in caught if "not writable" in str(w.message)]
    t = conv.tensors[2]
    assert t.data_ptr() == np.frombuffer(mv, dtype=np.uint8).ctypes.data  # same memory: no copy
    assert torch.equal(t, torch.from_numpy(ctr)) and conv.rows == 3


def test_defaults_fill_declared_shapes_and_are_reported():
    feats = received({"cand_ctr": [0.5, 0.25], "cand_emb": [[1.0, 2.0], [3.0, 4.0]], "other": "x", "more": 1})
    conv = Converter(SIG).convert(feats)
    assert conv.defaulted == ["user_dense", "user_age", "cand_price"]
    assert sorted(conv.unused) == ["more", "other"] and conv.n_features == 4
    dense, age, _, _, price = conv.tensors
    assert dense.shape == (4,) and float(dense.sum()) == 0.0
    assert age.shape == () and float(age) == 30.0
    assert price.dtype == torch.int32 and price.tolist() == [7, 7]


def test_one_element_value_for_a_scalar_input():
    feats = received(
        {"user_age": Tensor.from_numpy(np.array([41.0], np.float32)), "cand_ctr": [1.0], "cand_emb": [[1.0, 1.0]]})
    assert Converter(SIG).convert(feats).tensors[1].shape == ()


@pytest.mark.parametrize("features,needle", [
    ({}, "cand_ctr, cand_emb"),
    ({"cand_ctr": [1.0], "cand_emb": [[1.0, 1.0]], "cand_price": [1.5]}, "cand_price"),
    ({"cand_ctr": [1.0], "cand_emb": [[1.0, 1.0]], "cand_price": [2**40]}, "out of range for int32"),
    ({"cand_ctr": [1.0, 2.0], "cand_emb": [[1.0, 1.0]]}, "disagree"),
    ({"cand_ctr": [1.0], "cand_emb": [1.0, 1.0]}, "[C, 2]"),
    ({"cand_ctr": [1.0], "cand_emb": [[1.0, 1.0]],
      "user_dense": Tensor.from_numpy(np.zeros(4, np.float64))}, "float64"),
    ({"cand_ctr": [True], "cand_emb": [[1.0, 1.0]], "user_dense": {"a": 1}}, "a map"),
])
def test_bad_values_raise_payload_errors(features, needle):
    with pytest.raises(PayloadError, match=None) as info:
        Converter(SIG).convert(received(features))
    assert needle in str(info.value)


def test_output_to_wire_roundtrip_bfloat16_and_scalars():
    t = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    w = output_to_wire(t)
    assert w.dtype == "bfloat16" and w.shape == (2,) and len(w.data) == 4
    s = output_to_wire(torch.tensor(3, dtype=torch.int64))
    assert s.shape == () and s.to_numpy() == 3


def test_batch_assembly_from_raw_parts_equals_per_request_tensors():
    """The batcher joins raw request buffers once per input; the result must equal concatenating each
    request's own tensors (typed tensors, lists, defaults, a one-element scalar, unused features mixed)."""
    from leaf.batcher import Runner

    conv = Converter(SIG)
    reqs = [
        {"cand_ctr": Tensor.from_numpy(np.arange(3, dtype=np.float32)),
         "cand_emb": Tensor.from_numpy(np.ones((3, 2), np.float32)),
         "user_dense": Tensor.from_numpy(np.arange(4, dtype=np.float32)),
         "user_age": Tensor.from_numpy(np.array([41.0], np.float32))},
        {"cand_ctr": [0.5], "cand_emb": [[1.0, 2.0]], "cand_price": [3], "unused": 1},
        {"cand_ctr": Tensor.from_numpy(np.full(2, 7, np.float32)),
         "cand_emb": Tensor.from_numpy(np.zeros((2, 2), np.float32)),
         "cand_price": Tensor.from_numpy(np.array([1, 2], np.int32)),
         "other": Tensor.from_numpy(np.zeros(5, np.int64))},
    ]
    convs = [conv.convert(received(f)) for f in reqs]
    assert [c.rows for c in convs] == [3, 1, 2]
    assert convs[2].unused == ["other"] and convs[0].defaulted == ["cand_price"]
    runner = Runner(lambda *a: a, conv, ("score",), torch.device("cpu"))

    def check(convs):
        batched = runner.assemble(convs)
        for i, plan in enumerate(conv.plans):
            per_req = [c.tensors[i] for c in convs]
            if plan.cand_axis is None:
                want = torch.cat([t.unsqueeze(0).expand(c.rows, *t.shape) for t, c in zip(per_req, convs)])
            else:
                want = torch.cat(per_req)
            assert batched[i].dtype == want.dtype and torch.equal(batched[i], want), plan.name

    check(convs)  # uneven candidate counts: repeat_interleave
    uniform = [{**reqs[0], "user_dense": Tensor.from_numpy(np.full(4, k, np.float32))} for k in range(3)]
    check([conv.convert(received(f)) for f in uniform])  # equal counts: expand + reshape
    alone = runner.assemble(convs[:1])
    assert alone[2].data_ptr() == convs[0].tensors[2].data_ptr()  # a lone request is wrapped, not copied
    outs = runner.split([torch.arange(6, dtype=torch.float32)], [3, 1, 2])
    assert [o[0].to_numpy().tolist() for o in outs] == [[0.0, 1.0, 2.0], [3.0], [4.0, 5.0]]


def test_settle_gc_freezes_loaded_objects_and_reclaims_dropped_cycles():
    """Models live outside the cyclic GC's walk; a dropped version's cycles are still collected (no leak)."""
    import gc
    import weakref

    from leaf.gctune import settle_gc

    class Node:
        pass

    a, b = Node(), Node()
    a.peer, b.peer = b, a  # a cycle, like a torch.export module's graph
    gone = weakref.ref(a)
    try:
        settle_gc(collect=False)
        assert gc.get_freeze_count() > 0
        del a, b
        gc.collect()
        assert gone() is not None  # frozen: ordinary collections leave it alone
        settle_gc(collect=True)
        assert gone() is None
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("name, array", [
    ("a", np.zeros(12, np.float32)),            # rank 1 for a declared [-1, 4]
    ("a", np.zeros((3, 4, 1), np.float32)),     # rank 3
    ("a", np.zeros((3, 5), np.float32)),        # wrong fixed dimension
    ("b", np.zeros((3, 1), np.float32)),        # rank 2 for a declared [-1]
])
def test_typed_tensor_of_the_wrong_shape_is_refused_naming_the_feature(name, array):
    """The fast path must not accept a typed tensor whose rank or fixed dimensions differ from the signature."""
    conv = Converter(parse_signature(json.dumps({"input_names": ["a", "b"], "output_names": ["s"],
                                      "inputs": {"a": {"dtype": "float32", "shape": [-1, 4]},
                                                 "b": {"dtype": "float32", "shape": [-1]}}}).encode()))
    good = {"a": Tensor.from_numpy(np.zeros((3, 4), np.float32)), "b": Tensor.from_numpy(np.zeros(3, np.float32))}
    ok = conv.convert(good)
    assert ok.rows == 3 and ok.shapes == [(3, 4), (3,)]
    with pytest.raises(PayloadError, match=f"'{name}'"):
        conv.convert({**good, name: Tensor.from_numpy(array)})
