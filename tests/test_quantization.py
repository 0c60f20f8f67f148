"""The int8 build of the default model: built by the product's model build, loaded by the fastembed
provider under a model identity of its own, embedding for real, and never mixed with float32 data."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from mcp_rag.embedding import Embedder, model_build
from mcp_rag.embedding.factory import DEFAULT_QUANTIZATION, resolve_model
from mcp_rag.embedding.model_build import Quantization
from mcp_rag.errors import ConfigurationError
from mcp_rag.local.address import address
from mcp_rag.local.election import try_hold
from mcp_rag.local.holder import hold
from mcp_rag.runtime import open_runtime
from mcp_rag.settings import Settings
from tests.pgcluster import PgServer
from tests.reliability_support import base_env, run_cli

FP32_NAME = "sentence-transformers/all-MiniLM-L6-v2"
INT8_NAME = "sentence-transformers/all-MiniLM-L6-v2@int8-unfused"
FUSED_INT8_NAME = "sentence-transformers/all-MiniLM-L6-v2@int8"
"""The int8 build run with ONNX Runtime's SkipLayerNormalization fusion (mcp-rag before 2026-12-01)."""

DOCUMENTS = {
    "note://lighthouse": "Lighthouses guide ships past dangerous rocks at night with a rotating beam of light.",
    "note://bread": "Sourdough bread rises slowly because wild yeast and lactic bacteria ferment the dough.",
    "note://glacier": "Glaciers carve deep valleys as the ice grinds over bedrock during centuries of movement.",
    "note://chess": "In chess, castling moves the king two squares toward a rook to protect it early.",
}
# Queries sharing no word with their document: only a real dense model can find it.
QUERIES = {
    "how do sailors avoid reefs in the dark": "note://lighthouse",
    "fermented loaf made with natural leaven": "note://bread",
    "frozen rivers eroding mountains": "note://glacier",
    "protecting the monarch on the board game": "note://chess",
}


# --- the build ------------------------------------------------------------------------------------


def test_the_int8_build_is_the_quantised_default_model(model_dir: Path, int8_model_dir: Path) -> None:
    assert int8_model_dir == model_dir.parent / "all-MiniLM-L6-v2-onnx-int8"
    info = json.loads((int8_model_dir / "BUILD_INFO.json").read_text())
    fp32_info = json.loads((model_dir / "BUILD_INFO.json").read_text())
    assert info["quantization"] == "int8"
    assert info["source_model_onnx_sha256"] == fp32_info["model_onnx_sha256"]
    assert info["model_onnx_size"] == (int8_model_dir / "model.onnx").stat().st_size
    # int8 weights: about a quarter of the float graph
    assert info["model_onnx_size"] < 0.3 * (model_dir / "model.onnx").stat().st_size
    assert 0.9 <= info["min_cosine_to_float_model"] < 0.999
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "special_tokens_map.json"):
        assert (int8_model_dir / name).read_bytes() == (model_dir / name).read_bytes()
    assert model_build.folder_quantization(int8_model_dir) == "int8"
    assert model_build.folder_quantization(model_dir) == "none"


def test_the_int8_build_is_cached_and_deterministic(
    model_dir: Path, int8_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(model_dir, tmp_path / model_dir.name)  # the float build, as `model build` leaves it
    built = model_build.provision_default_model(tmp_path, quantization="int8")
    assert (built / "model.onnx").read_bytes() == (int8_model_dir / "model.onnx").read_bytes()

    def must_not_run(*args: object) -> None:
        raise AssertionError("the cached int8 build was rebuilt")

    monkeypatch.setattr(model_build, "_write_quantized_files", must_not_run)
    assert model_build.provision_default_model(tmp_path, quantization="int8") == built
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all-MiniLM-L6-v2-onnx", "all-MiniLM-L6-v2-onnx-int8"]


def test_a_float_folder_is_not_taken_for_the_int8_build(model_dir: Path, tmp_path: Path) -> None:
    """A folder of the float build under the int8 name (copied by hand) is rebuilt, not served as int8."""
    shutil.copytree(model_dir, tmp_path / model_dir.name)
    shutil.copytree(model_dir, tmp_path / "all-MiniLM-L6-v2-onnx-int8")
    built = model_build.provision_default_model(tmp_path, quantization="int8")
    assert model_build.folder_quantization(built) == "int8"


# --- the provider and its identity ----------------------------------------------------------------


def test_the_int8_model_has_an_identity_of_its_own(embedder: Embedder, int8_embedder: Embedder) -> None:
    fp32, int8 = embedder.identity, int8_embedder.identity
    assert (fp32.name, int8.name) == (FP32_NAME, INT8_NAME)
    assert fp32.dimension == int8.dimension == 384
    assert not fp32.matches(int8) and not int8.matches(fp32)
    assert fp32.fingerprint_distance(int8) > 1e-3  # its vectors move too, not only its name


async def test_int8_vectors_are_close_to_the_float_ones_but_not_equal(
    embedder: Embedder, int8_embedder: Embedder
) -> None:
    texts = list(DOCUMENTS.values())
    fp32 = np.stack([e.dense for e in await embedder.embed_passages(texts)])
    int8 = np.stack([e.dense for e in await int8_embedder.embed_passages(texts)])
    cosines = (fp32 * int8).sum(axis=1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1))
    assert np.all(cosines > 0.85) and np.all(cosines < 0.999), cosines


@pytest.fixture(scope="module")
def fused_int8_embedder(int8_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("fused-int8-embedder"),
        embedding_model_dir=int8_model_dir,
        embedding_fused_layer_norm=True,
        _env_file=None,
    )
    instance = Embedder(settings)
    instance.load_sync()
    return instance


async def test_the_int8_build_run_with_the_fused_graph_is_a_model_of_its_own(
    int8_embedder: Embedder, fused_int8_embedder: Embedder
) -> None:
    """The same int8 file run with ONNX Runtime's SkipLayerNormalization fusion gives slightly other
    vectors: too far apart to share an index, close enough to be the same model."""
    unfused, fused = int8_embedder.identity, fused_int8_embedder.identity
    assert (unfused.name, fused.name) == (INT8_NAME, FUSED_INT8_NAME)
    assert unfused.fingerprint_distance(fused) > 1e-3
    assert not unfused.matches(fused) and not fused.matches(unfused)
    texts = list(DOCUMENTS.values())
    a = np.stack([e.dense for e in await int8_embedder.embed_passages(texts)])
    b = np.stack([e.dense for e in await fused_int8_embedder.embed_passages(texts)])
    cosines = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert np.all(cosines > 0.99) and cosines.min() < 0.9999, cosines  # some move, none far


def test_the_settings_choose_the_build(model_dir: Path, int8_model_dir: Path, tmp_path: Path) -> None:
    def settings(**values: object) -> Settings:
        return Settings(data_dir=tmp_path, _env_file=None, **values)  # type: ignore[arg-type]

    # a built folder says which build it holds
    assert resolve_model(settings(embedding_model_dir=int8_model_dir)) == (int8_model_dir, "int8")
    assert resolve_model(settings(embedding_model_dir=model_dir)) == (model_dir, "none")
    with pytest.raises(ConfigurationError, match="holds the 'int8' build"):
        resolve_model(settings(embedding_model_dir=int8_model_dir, embedding_quantization="none"))
    with pytest.raises(ConfigurationError, match="holds the 'none' build"):
        resolve_model(settings(embedding_model_dir=model_dir, embedding_quantization="int8"))
    # a folder made by hand is what the setting says
    hand_made = tmp_path / "hand-made"
    shutil.copytree(int8_model_dir, hand_made)
    (hand_made / "BUILD_INFO.json").unlink()
    assert resolve_model(settings(embedding_model_dir=hand_made, embedding_quantization="int8"))[1] == "int8"
    # the int8 build exists for the default model only, and for the local provider only
    with pytest.raises(ConfigurationError, match="default model"):
        resolve_model(settings(embedding_model="BAAI/bge-small-en-v1.5", embedding_quantization="int8"))
    with pytest.raises(ValidationError, match="openai provider"):
        settings(embedding_provider="openai", embedding_base_url="http://127.0.0.1:9/v1", embedding_quantization="int8")


def test_without_a_folder_the_default_model_is_provisioned_in_the_chosen_build(
    model_dir: Path, int8_model_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "data" / "models"
    models.mkdir(parents=True)
    shutil.copytree(model_dir, models / model_dir.name)  # as `mcp-rag model build` leaves it
    settings = Settings(data_dir=tmp_path / "data", embedding_quantization="int8", _env_file=None)
    folder, quantization = resolve_model(settings)
    assert (folder, quantization) == (models / "all-MiniLM-L6-v2-onnx-int8", "int8")
    assert folder is not None
    assert (folder / "model.onnx").read_bytes() == (int8_model_dir / "model.onnx").read_bytes()


# --- through the real service ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
async def test_search_with_the_int8_model_finds_the_right_document(
    make_settings: Callable[..., Settings], int8_model_dir: Path, int8_embedder: Embedder, mode: str
) -> None:
    settings = make_settings(embedding_model_dir=int8_model_dir)
    async with open_runtime(settings, embedder=int8_embedder) as rt:
        for uri, text in DOCUMENTS.items():
            await rt.service.ingest_text("default", text, source_uri=uri)
        for query, expected in QUERIES.items():
            hits = await rt.service.search("default", query, mode=mode, top_k=4)
            assert hits[0].source_uri == expected, (query, [h.source_uri for h in hits])


@pytest.mark.parametrize("first", ["fp32", "int8"])
async def test_a_database_of_one_build_refuses_the_other(
    make_settings: Callable[..., Settings],
    embedder: Embedder,
    int8_embedder: Embedder,
    model_dir: Path,
    int8_model_dir: Path,
    first: str,
) -> None:
    builds = {"fp32": (embedder, model_dir), "int8": (int8_embedder, int8_model_dir)}
    second = "int8" if first == "fp32" else "fp32"
    used, folder = builds[first]
    async with open_runtime(make_settings(embedding_model_dir=folder), embedder=used) as rt:
        await rt.service.ingest_text("default", DOCUMENTS["note://chess"], source_uri="note://chess")
    other, other_folder = builds[second]
    settings = make_settings(embedding_model_dir=other_folder, data_dir=make_settings().data_dir / "fresh")
    with pytest.raises(ConfigurationError) as info:
        async with open_runtime(settings, embedder=other):
            pass
    message = str(info.value)
    stored, configured = (FP32_NAME, INT8_NAME) if first == "fp32" else (INT8_NAME, FP32_NAME)
    assert "\n" not in message
    assert f"the database holds vectors of model fastembed:{stored} (384-d" in message
    assert f"configured with fastembed:{configured} (384-d" in message
    wanted = "none" if first == "fp32" else "int8"
    assert f"MCP_RAG_EMBEDDING_QUANTIZATION={wanted} selects this data's" in message
    # the first build still opens it
    async with open_runtime(make_settings(embedding_model_dir=folder), embedder=used) as rt:
        [hit] = await rt.service.search("default", "castling the king", mode="dense", top_k=1)
        assert hit.source_uri == "note://chess"


# --- through the command line ---------------------------------------------------------------------


@pytest.mark.integration
def test_model_build_produces_the_int8_build(model_dir: Path, int8_model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "models"
    shutil.copytree(model_dir, output / model_dir.name)  # the float build is there already: only quantise
    env = base_env(model_dir, tmp_path / "data")
    del env["MCP_RAG_EMBEDDING_MODEL_DIR"]
    done = run_cli("model", "build", "--quantization", "int8", "--output", str(output), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(output / "all-MiniLM-L6-v2-onnx-int8")
    built = Path(done.stdout.strip())
    assert (built / "model.onnx").read_bytes() == (int8_model_dir / "model.onnx").read_bytes()
    assert "Quantization parameters" not in done.stderr  # the quantiser's per-tensor chatter stays out
    # the setting chooses the same build
    env["MCP_RAG_EMBEDDING_QUANTIZATION"] = "int8"
    again = run_cli("model", "build", "--output", str(output), env=env)
    assert again.returncode == 0 and again.stdout.strip() == str(built), again.stderr


@pytest.mark.integration
def test_the_cli_refuses_a_database_of_the_other_build_in_one_line(
    database_url: str, model_dir: Path, int8_model_dir: Path, tmp_path: Path
) -> None:
    fp32 = base_env(model_dir, tmp_path / "fp32", database_url)
    done = run_cli("stats", env=fp32)  # claims the database for the float build
    assert done.returncode == 0, done.stderr
    int8 = base_env(int8_model_dir, tmp_path / "int8", database_url)
    refused = run_cli("stats", env=int8)
    lines = [line for line in refused.stderr.strip().splitlines() if not line.startswith("20")]  # log lines
    assert refused.returncode == 2, refused.stderr
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith(f"mcp-rag: the database holds vectors of model fastembed:{FP32_NAME} (384-d")
    assert f"configured with fastembed:{INT8_NAME}" in lines[0]
    assert "Traceback" not in refused.stderr


async def test_unset_quantization_keeps_the_build_a_database_was_made_with(
    make_settings: Callable[..., Settings],
    model_dir: Path,
    int8_model_dir: Path,
    pg_server: PgServer,
    template_db: str,
    tmp_path: Path,
) -> None:
    """Data embedded with one build keeps it when the setting is unset, whatever the default build is;
    a new database gets the default build."""
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    for folder in (model_dir, int8_model_dir):  # as `mcp-rag model build` leaves them
        shutil.copytree(folder, data / "models" / folder.name)
    other: Quantization = "none" if DEFAULT_QUANTIZATION == "int8" else "int8"
    names = {"none": FP32_NAME, "int8": INT8_NAME}

    async with open_runtime(make_settings(embedding_model_dir=None, embedding_quantization=other)) as rt:
        assert rt.embedder.identity.name == names[other]
        await rt.service.ingest_text("default", DOCUMENTS["note://glacier"], source_uri="note://glacier")
    async with open_runtime(make_settings(embedding_model_dir=None)) as rt:
        assert rt.embedder.identity.name == names[other]
        assert rt.settings.embedding_quantization == other
        [hit] = await rt.service.search("default", QUERIES["frozen rivers eroding mountains"], mode="dense", top_k=1)
        assert hit.source_uri == "note://glacier"
    # The same through a holder (every stdio server and CLI command), which starts loading the model
    # from the settings alone before the database says which build its vectors are.
    settings = make_settings(embedding_model_dir=None)
    lock = try_hold(address(settings.data_dir))
    assert lock is not None
    async with hold(settings, lock) as holder:
        assert holder.runtime.embedder.identity.name == names[other]
        [hit] = await holder.runtime.service.search(
            "default", QUERIES["frozen rivers eroding mountains"], mode="dense", top_k=1
        )
        assert hit.source_uri == "note://glacier"

    fresh = f"t_{uuid.uuid4().hex[:16]}"
    url = pg_server.create_database(fresh, template=template_db)
    try:
        settings = make_settings(embedding_model_dir=None, database_url=url, data_dir=tmp_path / "fresh")
        (tmp_path / "fresh").mkdir()
        (tmp_path / "fresh" / "models").symlink_to(data / "models")
        async with open_runtime(settings) as rt:
            assert rt.embedder.identity.name == names[DEFAULT_QUANTIZATION]
    finally:
        pg_server.drop_database(fresh)


async def test_a_database_embedded_with_the_fused_graph_keeps_it(
    make_settings: Callable[..., Settings], int8_model_dir: Path
) -> None:
    """Vectors made before the int8 build ran unfused keep the fused graph while the setting is unset;
    setting the other graph is refused in one line that names the setting to use."""
    async with open_runtime(make_settings(embedding_model_dir=int8_model_dir, embedding_fused_layer_norm=True)) as rt:
        assert rt.embedder.identity.name == FUSED_INT8_NAME
        await rt.service.ingest_text("default", DOCUMENTS["note://bread"], source_uri="note://bread")
    async with open_runtime(make_settings(embedding_model_dir=int8_model_dir)) as rt:
        assert rt.embedder.identity.name == FUSED_INT8_NAME
        assert rt.settings.embedding_fused_layer_norm is True
        [hit] = await rt.service.search("default", QUERIES["fermented loaf made with natural leaven"], top_k=1)
        assert hit.source_uri == "note://bread"
    # A holder starts loading the model from the settings alone (unfused) before the database answers.
    settings = make_settings(embedding_model_dir=int8_model_dir)
    lock = try_hold(address(settings.data_dir))
    assert lock is not None
    async with hold(settings, lock) as holder:
        assert holder.runtime.embedder.identity.name == FUSED_INT8_NAME
    settings = make_settings(embedding_model_dir=int8_model_dir, embedding_fused_layer_norm=False)
    with pytest.raises(ConfigurationError) as info:
        async with open_runtime(settings):
            pass
    message = str(info.value)
    assert "\n" not in message
    assert f"the database holds vectors of model fastembed:{FUSED_INT8_NAME} (384-d" in message
    assert f"configured with fastembed:{INT8_NAME} (384-d" in message
    assert "MCP_RAG_EMBEDDING_FUSED_LAYER_NORM=true selects this data's" in message
