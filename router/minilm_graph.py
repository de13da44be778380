"""A compact ONNX Runtime graph for the packaged MiniLM, built in memory when the model loads.

The packaged model is a plain PyTorch export: about 270 small nodes (attention spelled out as
reshapes, transposes, slices and NaN guards) and int8 weights that ONNX Runtime turns back into
float32 at load, so every query multiplies by 42 MB of float weights. For a short question the
small nodes take about a third of the time and the float products the rest. This module reads
the same weights and lays out the same network with ONNX Runtime's fused CPU operators
(`MultiHeadAttention`, `SkipLayerNormalization`, `BiasGelu`; Q, K and V in one product) and
int8 products: about 60 nodes, and less time (a short question: 4.3 -> 2.1 ms on one machine,
6.9 -> 5.4 ms on an AVX2-only EPYC; 256 tokens: 61 -> 36 ms, 125 -> about 105 ms).

Each layer's post-GELU product is a `MatMulNBits` on the package's own int8 codes and
per-column scales; it quantizes activations per block of 32 values. The other three (Q/K/V,
attention output, the first feed-forward one) are `DynamicQuantizeMatMul`: one activation scale
per call, faster, but it would crush the few input channels that run far larger than the rest.
So each channel's range is first moved partly into the weights (SmoothQuant, Xiao et al.
2023): the input is divided by s and the weight's row multiplied by it (then re-quantized per
column), with s = range ** SMOOTHING / weight_range ** (1 - SMOOTHING) and the ranges measured
once on sample questions and prompts, committed at `RANGES_PATH` (rebuilt with
`python -m router.minilm_graph calibrate FILE...`). The post-GELU inputs are too uneven for it.

The integer products are exact on every CPU, so the graph gives one answer everywhere. ONNX
Runtime's u8 x s8 kernels on x86 CPUs without VNNI multiply with `vpmaddubsw`, which saturates
a pair's sum at int16 (255 * 127 * 2 > 32767): with int8 weights this graph strayed to cosine
0.989 on such a CPU. Its `DynamicQuantizeMatMul` weights are therefore uint8 (the int8 code +
128, zero point 128, lossless), which selects the u8 x u8 kernels: they widen to int16 and sum
in int32, exactly. `MatMulNBits` (int8 activations, accuracy level 4) is exact as it is.
`tests/router/test_minilm_exact.py` checks both against integer arithmetic on inputs that
would saturate.

Vectors stay within cosine 0.9995 (mean; 0.998 at worst over 1,500 questions) of the packaged
graph's. A shared activation scale makes a row depend on the others in its call (padding
included), so `Embedder` runs this graph one text at a time. Quantized activations are not
continuous in the float values before them: where another CPU's float kernels (attention,
normalization) round differently in the last bit, a vector can move by up to the quantization
error (a few 1e-3 per component), not only by float rounding. Needs the `onnx` package;
`Embedder` falls back to the packaged graph when the compact one cannot be built or loaded, or
strays from it on a few probe questions at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["RANGES_PATH", "GraphMismatch", "activation_ranges", "compact_model"]

LAYERS = 6
HIDDEN = 384
HEADS = 12
BLOCK = 32  # values per activation block quantized together by MatMulNBits
EPSILON = 1e-12
PROJECTIONS = ("attention.self.query", "attention.self.key", "attention.self.value",
               "attention.output.dense", "intermediate.dense", "output.dense")
SMOOTHED = ("qkv", "attention_output", "up")  # per layer, in `activation_ranges` order
SMOOTHING = 0.75  # the share of an input channel's range moved into the weight
RANGES_PATH = Path(__file__).parent / "assets" / "minilm-activation-ranges.npy"


class GraphMismatch(ValueError):
    """The packaged export does not have the layout this builder expects."""


@dataclass(frozen=True)
class _Int8:
    """A weight as the package stores it: int8 codes (in x out) times a scale per column."""

    codes: np.ndarray
    scales: np.ndarray


def compact_model(path: Path, ranges: np.ndarray | None = None) -> bytes:
    """The serialized compact model for the packaged export at `path`, smoothed with `ranges`
    (default: the committed ones)."""
    return _builder(path, _committed_ranges() if ranges is None else ranges) \
        .model().SerializeToString()


def activation_ranges(path: Path, encoded: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The largest |input| per channel of each smoothed product, shape (LAYERS, 3, HIDDEN),
    over sample inputs (`(input_ids, attention_mask)`, one text each)."""
    import onnx
    import onnxruntime as ort

    builder = _builder(path, None)
    model = builder.model()
    names = list(builder.smoothed_inputs)
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                                 None) for name in names)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ranges = np.zeros((len(names), HIDDEN), dtype=np.float32)
    for ids, mask in encoded:
        outputs = session.run(names, {"input_ids": ids, "attention_mask": mask,
                                      "token_type_ids": np.zeros_like(ids)})
        for row, output in enumerate(outputs):
            ranges[row] = np.maximum(ranges[row], np.abs(output).reshape(-1, HIDDEN).max(axis=0))
    return ranges.reshape(LAYERS, len(SMOOTHED), HIDDEN)


def _builder(path: Path, ranges: np.ndarray | None) -> _Builder:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    return _Builder(tensors, _projection_weights(graph, tensors), ranges)


def _committed_ranges() -> np.ndarray:
    try:
        ranges = np.load(RANGES_PATH, allow_pickle=False).astype(np.float32)
    except (OSError, ValueError) as exc:
        raise GraphMismatch(f"cannot read the activation ranges {RANGES_PATH.name}: {exc}") \
            from exc
    if ranges.shape != (LAYERS, len(SMOOTHED), HIDDEN) or not np.isfinite(ranges).all():
        raise GraphMismatch(f"{RANGES_PATH.name}: shape {ranges.shape} or values not finite, "
                            "not ranges for this model")
    return ranges


def _projection_weights(graph, tensors: dict[str, np.ndarray]) -> dict[str, _Int8]:
    """Each projection's int8 weight, named after the bias added to its output."""
    int8 = {}  # dequantized name -> weight, from the Mul(Cast(codes), scale) pattern
    for node in graph.node:
        codes = node.input[0].removesuffix("_f") + "_q" if node.op_type == "Mul" else None
        if codes in tensors and node.input[1] in tensors:
            int8[node.output[0]] = _Int8(tensors[codes], tensors[node.input[1]].reshape(-1))
    weight_of = {n.output[0]: n.input[1] for n in graph.node
                 if n.op_type == "MatMul" and n.input[1] in int8}
    found = {}
    for node in graph.node:
        if node.op_type == "Add" and node.input[0] in weight_of:
            found[node.input[1].removesuffix(".bias")] = int8[weight_of[node.input[0]]]
    expected = {_name(layer, p) for layer in range(LAYERS) for p in PROJECTIONS}
    if set(found) != expected:
        raise GraphMismatch(f"projections found: {sorted(set(found) ^ expected)[:4]} differ")
    return found


def _name(layer: int, projection: str) -> str:
    return f"inner.encoder.layer.{layer}.{projection}"


class _Builder:
    """Accumulates nodes and initializers for the compact graph."""

    def __init__(self, tensors: dict[str, np.ndarray], weights: dict[str, _Int8],
                 ranges: np.ndarray | None) -> None:
        self.tensors, self.weights, self.ranges = tensors, weights, ranges
        self.nodes: list = []
        self.initializers: list = []
        self.smoothed_inputs: list[str] = []  # in `activation_ranges` order

    def model(self):
        from onnx import TensorProto, helper

        hidden = self._embeddings()
        for layer in range(LAYERS):
            hidden = self._layer(layer, hidden)
        inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "tokens"])
                  for name in ("input_ids", "attention_mask", "token_type_ids")]
        output = helper.make_tensor_value_info(hidden, TensorProto.FLOAT,
                                               ["batch", "tokens", HIDDEN])
        graph = helper.make_graph(self.nodes, "minilm-compact", inputs, [output],
                                  self.initializers)
        model = helper.make_model(graph, opset_imports=[
            helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 9
        return model

    def _embeddings(self) -> str:
        from onnx import TensorProto

        embeddings = "inner.embeddings."
        self._node("Shape", ["input_ids"], ["shape"], start=1, end=2)
        self._node("Squeeze", ["shape"], ["tokens"])
        self._node("Range", [self._const("zero", np.array(0, np.int64)), "tokens",
                             self._const("one", np.array(1, np.int64))], ["positions"])
        words = self._dequantized(embeddings + "word_embeddings.weight")
        positions = self._dequantized(embeddings + "position_embeddings.weight")
        self._node("Gather", [words, "input_ids"], ["word_vectors"])
        self._node("Gather", [positions, "positions"], ["position_vectors"])
        self._node("Gather", [self._tensor(embeddings + "token_type_embeddings.weight"),
                              "token_type_ids"], ["type_vectors"])
        self._node("Add", ["word_vectors", "position_vectors"], ["word_position"])
        self._node("Add", ["word_position", "type_vectors"], ["summed"])
        self._node("LayerNormalization", ["summed", self._tensor(embeddings + "LayerNorm.weight"),
                                          self._tensor(embeddings + "LayerNorm.bias")],
                   ["hidden_0"], axis=-1, epsilon=EPSILON)
        self._node("Cast", ["attention_mask"], ["key_mask"], to=TensorProto.INT32)
        return "hidden_0"

    def _layer(self, layer: int, hidden: str) -> str:
        at = f"layer_{layer}_"
        query, key, value = (self.weights[_name(layer, p)] for p in PROJECTIONS[:3])
        qkv = _Int8(np.concatenate([query.codes, key.codes, value.codes], axis=1),
                    np.concatenate([query.scales, key.scales, value.scales]))
        bias = np.concatenate([self.tensors[_name(layer, p) + ".bias"] for p in PROJECTIONS[:3]])
        self._linear(hidden, qkv, at + "qkv", bias, smooth=(layer, 0))
        split = self._const(at + "split", np.full(3, HIDDEN, np.int64))
        self._node("Split", [at + "qkv", split], [at + "q", at + "k", at + "v"], axis=-1)
        self._node("MultiHeadAttention", [at + "q", at + "k", at + "v", "", "key_mask"],
                   [at + "context"], domain="com.microsoft", num_heads=HEADS)
        attended = self._residual_norm(layer, "attention.output", at + "context", hidden,
                                       smooth=(layer, 1))
        self._linear(attended, self.weights[_name(layer, "intermediate.dense")], at + "up",
                     smooth=(layer, 2))
        self._node("BiasGelu", [at + "up", self._tensor(_name(layer, "intermediate.dense.bias"))],
                   [at + "gelu"], domain="com.microsoft")
        return self._residual_norm(layer, "output", at + "gelu", attended)

    def _residual_norm(self, layer: int, block: str, x: str, residual: str,
                       smooth: tuple[int, int] | None = None) -> str:
        """LayerNorm(x @ W + bias + residual): the dense projection closing each block."""
        prefix, out = _name(layer, block), f"layer_{layer}_{block}"
        self._linear(x, self.weights[prefix + ".dense"], out + "_dense", smooth=smooth)
        self._node("SkipLayerNormalization",
                   [out + "_dense", residual, self._tensor(prefix + ".LayerNorm.weight"),
                    self._tensor(prefix + ".LayerNorm.bias"), self._tensor(prefix + ".dense.bias")],
                   [out], domain="com.microsoft", epsilon=EPSILON)
        return out

    def _linear(self, x: str, weight: _Int8, out: str, bias: np.ndarray | None = None,
                smooth: tuple[int, int] | None = None) -> None:
        """x @ weight (+ bias): smoothed when `smooth` names committed ranges, else as
        MatMulNBits."""
        if smooth is not None:
            self.smoothed_inputs.append(x)
            if self.ranges is not None:
                return self._smoothed(x, weight, out, bias, self.ranges[smooth])
        return self._blockwise(x, weight, out, bias)

    def _smoothed(self, x: str, weight: _Int8, out: str, bias: np.ndarray | None,
                  ranges: np.ndarray) -> None:
        """(x / s) @ (s * weight) as DynamicQuantizeMatMul, the weight re-quantized to int8
        with one scale per output column (see the module docstring for s), stored as uint8
        codes + 128 with zero point 128 so that ONNX Runtime's exact u8 x u8 kernels run."""
        w = weight.codes.astype(np.float32) * weight.scales[None, :]
        s = np.maximum(ranges, 1e-5) ** SMOOTHING \
            / np.maximum(np.abs(w).max(axis=1), 1e-5) ** (1 - SMOOTHING)
        w *= s[:, None]
        scales = np.abs(w).max(axis=0) / 127.0
        codes = np.clip(np.round(w / scales), -127, 127).astype(np.int16)
        self._node("Mul", [x, self._const(out + "_inverse_s", (1.0 / s).astype(np.float32))],
                   [out + "_smoothed"])
        inputs = [out + "_smoothed", self._const(out + "_codes", (codes + 128).astype(np.uint8)),
                  self._const(out + "_scales", scales.astype(np.float32)),
                  self._const(out + "_zero_point", np.array(128, np.uint8))]
        if bias is not None:
            inputs += [self._const(out + "_bias", bias.astype(np.float32))]
        self._node("DynamicQuantizeMatMul", inputs, [out], domain="com.microsoft")

    def _blockwise(self, x: str, weight: _Int8, out: str, bias: np.ndarray | None) -> None:
        """x @ weight (+ bias) as MatMulNBits: codes shifted to uint8 (its zero point is 128),
        one row per output column, each column's scale repeated for each block."""
        k, n = weight.codes.shape
        blocks = k // BLOCK
        packed = (weight.codes.T.astype(np.int16) + 128).astype(np.uint8).reshape(n, blocks, BLOCK)
        scales = np.repeat(weight.scales.astype(np.float32), blocks)
        inputs = [x, self._const(out + "_codes", packed), self._const(out + "_scales", scales)]
        if bias is not None:
            inputs += ["", "", self._const(out + "_bias", bias.astype(np.float32))]
        self._node("MatMulNBits", inputs, [out], domain="com.microsoft", K=k, N=n, bits=8,
                   block_size=BLOCK, accuracy_level=4)

    def _dequantized(self, name: str) -> str:
        """An int8 embedding table, expanded to float32 by ONNX Runtime when it loads."""
        from onnx import TensorProto

        codes, scale = self._tensor(name + "_q"), self._tensor(name + "_scale")
        self._node("Cast", [codes], [name + "_f"], to=TensorProto.FLOAT)
        self._node("Mul", [name + "_f", scale], [name])
        return name

    def _tensor(self, name: str) -> str:
        if name not in self.tensors:
            raise GraphMismatch(f"tensor {name} is missing from the export")
        return self._const(name, self.tensors[name])

    def _const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def _node(self, op: str, inputs: list[str], outputs: list[str], **attributes) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, **attributes))


def _sample_texts(files: list[Path], limit: int) -> list[str]:
    """Up to `limit` distinct texts (questions, prompts) from parquet files, in a fixed order
    that mixes the files."""
    import hashlib

    import pandas as pd

    texts: set[str] = set()
    for path in files:
        frame = pd.read_parquet(path)
        for column in ("q1", "q2", "prompt"):
            if column in frame.columns:
                texts.update(t for t in frame[column] if isinstance(t, str) and t.strip())
    return sorted(texts, key=lambda t: hashlib.sha256(t.encode()).digest())[:limit]


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="Measure the activation ranges the compact MiniLM graph is smoothed with.")
    parser.add_argument("command", choices=["calibrate"])
    parser.add_argument("files", nargs="+", type=Path,
                        help="parquet files with q1/q2 or prompt columns (e.g. the cache pairs "
                             "and the router's outcomes)")
    parser.add_argument("--texts", type=int, default=800)
    parser.add_argument("--out", type=Path, default=RANGES_PATH)
    args = parser.parse_args(argv)

    from router.embedding import Embedder, model_path

    texts = _sample_texts(args.files, args.texts)
    encoder = Embedder(compact=False)
    ranges = activation_ranges(model_path(), [encoder.encode([t]) for t in texts])
    np.save(args.out, ranges.astype(np.float16))
    print(f"{args.out}: ranges of {ranges.shape[0] * ranges.shape[1]} products over "
          f"{len(texts)} texts, largest {ranges.max():.1f}")


if __name__ == "__main__":
    main()
