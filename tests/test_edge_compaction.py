"""Compaction of the embedded index (``EdgeIndex`` with ``index/edge_optimize.py``): a child process
optimises a copy of the shard while the index serves, and the copy takes the shard's place with the
writes made meanwhile. Real engine, real child processes; a gate file holds a child back where a
test needs writes to happen while it runs."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from mcp_rag import metrics
from mcp_rag.index.base import (
    Cursor,
    FusionParams,
    IndexPoint,
    IndexQuery,
    ModelIdentity,
    PointPayload,
    SearchFilter,
    VectorIndex,
)
from mcp_rag.index.base import SparseVector as Sparse
from mcp_rag.index.qdrant_edge import EdgeIndex
from mcp_rag.runtime import open_runtime
from mcp_rag.settings import Settings

DIM = 384
MODEL = ModelIdentity("test/minilm", DIM)
REPO = Path(__file__).resolve().parents[1]

# The real optimiser, started only once the gate file exists.
GATED = (
    "import sys, time, pathlib\n"
    "gate = pathlib.Path(sys.argv[1])\n"
    "while not gate.exists(): time.sleep(0.02)\n"
    "from mcp_rag.index.edge_optimize import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


def points(ids: range, seed: int = 0, document: str = "d") -> list[IndexPoint]:
    rng = random.Random(seed)
    out = []
    for i in ids:
        dense = [rng.gauss(0, 1) for _ in range(DIM)]
        terms = sorted(rng.sample(range(1, 500), 5))
        payload = PointPayload("a", "c", f"{document}{i}", f"file:///{document}{i}.md")
        out.append(IndexPoint(i, dense, Sparse(terms, [rng.random() + 0.1 for _ in terms]), payload))
    return out


def query_of(p: IndexPoint) -> IndexQuery:
    return IndexQuery(dense=p.dense, sparse=p.sparse, filter=SearchFilter(tenant="a"), limit=5, fusion=FusionParams())


async def answers(index: VectorIndex, of: list[IndexPoint]) -> tuple[list[list[int]], list[float]]:
    """The dense and the BM25 rankings apart (fused ranks tie, and which of two tied points takes the
    last place is arbitrary): the ids in order, and the scores."""
    ranking, scores = [], []
    for p in of:
        for dense, sparse in ((p.dense, None), (None, p.sparse)):
            hits = await index.query(IndexQuery(dense=dense, sparse=sparse, filter=SearchFilter(tenant="a"), limit=8))
            ranking.append([h.id for h in hits])
            scores += [h.score for h in hits]
    return ranking, scores


def gate(index: EdgeIndex, directory: Path) -> Path:
    """Hold the index's compactions back until the returned file is created."""
    path = directory / "gate"
    index.optimizer = (sys.executable, "-c", GATED, str(path))
    return path


def compactions(outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value("mcp_rag_index_compactions_total", {"outcome": outcome}) or 0.0


def meta(directory: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((directory / "index_meta.json").read_text())
    return data


async def wait_for(condition: Callable[[], bool], seconds: float = 30) -> None:
    with anyio.fail_after(seconds):
        while not condition():
            await anyio.sleep(0.02)


@pytest.fixture(autouse=True)
def child_finds_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


async def test_a_compaction_keeps_every_point_and_answers_as_a_fresh_index(tmp_path: Path) -> None:
    """After a compaction the index answers as one that never held the deleted points (the engine
    counts deleted points in its BM25 statistics until it optimises)."""
    written = points(range(1, 601))
    fresh = EdgeIndex(tmp_path / "fresh", compact_points=0)
    await fresh.open(MODEL)
    try:
        await fresh.upsert(written[50:])
        expected = await answers(fresh, written[50::25])
    finally:
        await fresh.close()
    directory = tmp_path / "compacted"
    index = EdgeIndex(directory, compact_points=0)  # none by itself: the test says when
    done_before = compactions("done")
    await index.open(MODEL)
    try:
        for start in range(0, 600, 100):
            await index.upsert(written[start : start + 100])
        await index.delete_points(list(range(1, 51)))
        await index.set_cursor(9, "9@1")
        await index.settle()
        assert compactions("done") == done_before  # never due with compact_points=0
        await index.compact()
        assert not index.compacting
        assert compactions("done") == done_before + 1
        assert meta(directory)["compacted"] == 550
        assert meta(directory)["churn"] == 0
        assert await index.count() == 550
        assert await index.read_cursor() == Cursor(9, "9@1")
        ranking, scores = await answers(index, written[50::25])
        assert ranking == expected[0]
        assert scores == pytest.approx(expected[1], rel=1e-5)
        assert sorted(p.name for p in directory.iterdir() if p.name.startswith("shard")) == ["shard"]
    finally:
        await index.close()
    index = EdgeIndex(directory, compact_points=0)
    await index.open(MODEL)
    try:
        assert await index.count() == 550
        assert await index.read_cursor() == Cursor(9, "9@1")
        ranking, scores = await answers(index, written[50::25])
        assert ranking == expected[0]
        assert scores == pytest.approx(expected[1], rel=1e-5)
    finally:
        await index.close()


async def test_writes_made_during_a_compaction_reach_the_new_shard(tmp_path: Path) -> None:
    index = EdgeIndex(tmp_path, compact_points=200)
    opened = gate(index, tmp_path)
    await index.open(MODEL)
    try:
        await index.upsert(points(range(1, 301)))
        await index.set_cursor(1)
        assert index.compacting  # 300 points written: the child was started, and waits at the gate
        await wait_for(lambda: (tmp_path / "shard.next").is_dir())
        late = points(range(301, 351), seed=1, document="late")
        await index.upsert(late)
        await index.delete_points(list(range(1, 11)))
        await index.delete_documents("a", ["d11", "d12"])
        await index.set_cursor(2, "2@1")
        assert await index.count() == 338  # the serving shard has them at once
        opened.touch()
        await wait_for(lambda: not index.compacting)
        assert meta(tmp_path)["compacted"] == 338
        assert meta(tmp_path)["cursor"] == 2
        assert await index.count() == 338
        assert await index.point_ids() == set(range(13, 351))
        hits = await index.query(query_of(late[7]))
        assert hits[0].id == late[7].id
    finally:
        await index.close()
    index = EdgeIndex(tmp_path)
    await index.open(MODEL)
    try:
        assert await index.point_ids() == set(range(13, 351))
    finally:
        await index.close()


async def test_close_during_a_compaction_stops_its_child(tmp_path: Path) -> None:
    index = EdgeIndex(tmp_path, compact_points=100)
    gate(index, tmp_path)
    await index.open(MODEL)
    await index.upsert(points(range(1, 151)))
    await index.set_cursor(4)
    await wait_for(lambda: (tmp_path / "shard.next").is_dir())
    child = index._child
    assert child is not None
    with anyio.fail_after(10):
        await index.close()  # does not wait for the gate
    assert child.poll() is not None
    assert not (tmp_path / "shard.next").exists()
    index = EdgeIndex(tmp_path)
    await index.open(MODEL)
    try:
        assert await index.count() == 150
        assert await index.read_cursor() == Cursor(4)
        assert meta(tmp_path)["churn"] == 150  # still due: the next writes start another
    finally:
        await index.close()


async def test_clear_during_a_compaction_is_not_undone_by_it(tmp_path: Path) -> None:
    index = EdgeIndex(tmp_path, compact_points=100)
    opened = gate(index, tmp_path)
    await index.open(MODEL)
    try:
        await index.upsert(points(range(1, 151)))
        await wait_for(lambda: (tmp_path / "shard.next").is_dir())
        await index.clear()
        opened.touch()
        await wait_for(lambda: not index.compacting)
        assert await index.count() == 0
        assert await index.read_cursor() == Cursor()
    finally:
        await index.close()


async def test_a_failed_optimisation_leaves_the_index_serving(tmp_path: Path) -> None:
    index = EdgeIndex(tmp_path, compact_points=100)
    index.optimizer = (sys.executable, "-c", "import sys; sys.exit('no optimiser here')")
    failed_before = compactions("failed")
    await index.open(MODEL)
    try:
        await index.upsert(points(range(1, 151)))
        await wait_for(lambda: not index.compacting)
        assert compactions("failed") == failed_before + 1
        assert await index.count() == 150
        assert not (tmp_path / "shard.next").exists()
        await index.upsert(points(range(151, 161)))  # still writable, and still due
        assert await index.count() == 160
    finally:
        await index.close()


@pytest.mark.parametrize("stage", ["copied", "between_renames", "renamed"])
async def test_an_open_finishes_or_undoes_an_interrupted_compaction(tmp_path: Path, stage: str) -> None:
    """The directory as a crash would leave it at each step of a compaction; the meta file's cursor
    was rewound to the copy's before the first rename."""
    index = EdgeIndex(tmp_path)
    await index.open(MODEL)
    await index.upsert(points(range(1, 101)))
    await index.set_cursor(3)
    await index.close()
    shard, copy, old = tmp_path / "shard", tmp_path / "shard.next", tmp_path / "shard.old"
    shutil.copytree(shard, copy)
    if stage != "copied":
        shard.rename(old)
    if stage == "renamed":
        copy.rename(shard)
    index = EdgeIndex(tmp_path)
    await index.open(MODEL)
    try:
        assert await index.count() == 100
        assert await index.read_cursor() == Cursor(3)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("shard")) == ["shard"]
    finally:
        await index.close()


ARMED = (
    "import sys, time\n"
    "from mcp_rag.index.edge_optimize import die_with\n"
    "die_with(int(sys.argv[1]))\n"
    "print('armed', flush=True)\n"
    "time.sleep(60)\n"
)


@pytest.mark.parametrize("parent_alive", [True, False])
async def test_the_optimiser_ends_with_its_parent(parent_alive: bool) -> None:
    """A child whose server is gone (a kill -9) stops instead of optimising a copy nobody will swap
    in (the next open deletes the copy): at once if the parent is gone before it looks, else when
    the parent ends."""
    middle = (
        "import os, subprocess, sys\n"
        f"parent = os.getpid() if {parent_alive!r} else 1\n"
        f"child = subprocess.Popen([sys.executable, '-c', {ARMED!r}, str(parent)], stdout=subprocess.PIPE)\n"
        f"if {parent_alive!r}: assert child.stdout.readline() == b'armed\\n'\n"
        "print(child.pid, flush=True)\n"
    )
    done = await anyio.run_process([sys.executable, "-c", middle], check=True)
    pid = int(done.stdout.decode().split()[0])
    await wait_for(lambda: not _running(pid), 10)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


async def test_a_bulk_ingest_leaves_an_optimised_index(tmp_path: Path, model_dir: Path, database_url: str) -> None:
    """Through the service with the real model: a compaction the writes started runs beside the
    ingest, settle() finishes it, and every document is found after the swap."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        embedding_model_dir=model_dir,
        index_compact_points=20,
        sync_in_server=False,
        _env_file=None,
    )
    topics = ["volcano", "glacier", "orchard", "lighthouse", "bakery", "submarine", "meadow", "observatory"]
    async with open_runtime(settings) as rt:
        for round_ in range(3):
            for topic in topics:
                text = f"Notes {round_} on the {topic}: what a visitor to the {topic} should know first."
                await rt.service.ingest_text(
                    "default", text, title=f"{topic} {round_}", source_uri=f"n:{topic}:{round_}"
                )
        await rt.index.settle()
        state = meta(settings.embedded_index_dir)
        assert isinstance(state["churn"], int)
        assert state["churn"] < 20  # what is left is less than a compaction's worth
        assert isinstance(state["compacted"], int)
        assert 0 < state["compacted"] <= await rt.index.count() == len(topics) * 3
        for topic in topics:
            results = await rt.service.search("default", f"a visitor to the {topic}", top_k=3)
            assert results
            assert topic in results[0].text
