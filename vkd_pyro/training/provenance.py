"""What produced a run: package versions, the source commit, the text encoder, the data it saw.

Recorded in metrics.json (key "provenance") and, as a comment block, at the top of config.yaml, so
that a number in a table can be traced to the code, the libraries and the data behind it.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

PACKAGES = ("torch", "torchvision", "pyro-ppl", "transformers", "numpy", "scikit-learn", "pandas", "torchxrayvision")
SOURCE = Path(__file__).resolve().parents[2]  # the checkout of an editable install


def package_versions() -> dict:
    """{"python", "vkd-pyro", and each of PACKAGES: its installed version (None when missing)}."""
    versions = {"python": platform.python_version()}
    for name in ("vkd-pyro",) + PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(folder: Path = SOURCE) -> Optional[dict]:
    """{"commit": HEAD's hash, "dirty": uncommitted changes to tracked files} of the git checkout
    the package runs from; None for an installed copy (no .git) or where git is missing."""
    if not (folder / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def provenance(data) -> dict:
    """The provenance block of a run on `data` (a `vkd_pyro.data.prepare.PreparedData`)."""
    card = data.card
    return {
        "versions": package_versions(),
        "git": git_commit(),
        "command": " ".join(sys.argv),
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "text_encoder": data.text_encoder,
        "dataset": {"name": card["dataset"], "records": card["records"], "skipped": card["skipped"],
                    "splits": {name: {"records": s["records"], "positives": s["positives"]}
                               for name, s in card["splits"].items()}},
    }


def as_comment(block: dict) -> str:
    """The block as YAML comment lines, for the top of config.yaml (the config stays loadable)."""
    versions = ", ".join(f"{k} {v}" for k, v in block["versions"].items() if v)
    git = block["git"]
    lines = [f"# written by vkd-pyro at {block['started']} on {block['host']}",
             f"# command: {block['command']}",
             f"# versions: {versions}",
             "# source: " + (f"git {git['commit']}" + (" (uncommitted changes)" if git["dirty"] else "")
                             if git else "not a git checkout")]
    if block["text_encoder"]:
        lines.append(f"# text encoder: {block['text_encoder']['name']} (identity {block['text_encoder']['identity']})")
    dataset = block["dataset"]
    lines.append(f"# dataset: {dataset['name']}, {dataset['records']} records, split "
                 + " / ".join(f"{k} {v['records']}" for k, v in dataset["splits"].items()))
    return "\n".join(lines) + "\n"
