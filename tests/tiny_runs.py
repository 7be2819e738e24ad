"""The smallest demo configuration that still trains: the overrides the tests that run `train` share.

Sixty reports rendered at 32 px, a 16-d latent, one hidden layer of 16, narrow encoders, one epoch,
batches of 16, two test samples, no progress bar. A test file changes what it needs:
`tiny_overrides({"train.max_epochs": 2})`.
"""

from pathlib import Path

import yaml

from vkd_pyro.config import parse_override

TINY_RUN = {
    "data.max_reports": 60,
    "data.image_size": 32,
    "model.z_dim": 16,
    "model.hidden": "[16]",
    "image_encoder.width": 8,
    "image_encoder.out_features": 32,
    "text_encoder.block_width": 32,
    "text_encoder.block_heads": 2,
    "text_encoder.block_ffn": 64,
    "train.max_epochs": 1,
    "train.batch_size": 16,
    "inference.test_samples": 2,
    "train.progress": "false",
}


def write_config_file(path, overrides) -> Path:
    """The `key.sub=value` overrides as a YAML config file at `path`, as a user would write it."""
    tree: dict = {}
    for text in overrides:
        key, value = parse_override(text)
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = Path(path)
    path.write_text(yaml.safe_dump(tree))
    return path


def tiny_overrides(changes: dict | None = None) -> list[str]:
    """`key=value` overrides of TINY_RUN with `changes` applied (a value None drops the key)."""
    values = {**TINY_RUN, **(changes or {})}
    return [f"{key}={value}" for key, value in values.items() if value is not None]


def train_tiny_run(tmp_path_factory, name: str) -> Path:
    """A finished one-epoch tiny run in a fresh temporary folder, its cache under the session's base
    folder as `<name>-cache` (module-scoped fixtures train it once and hand out copies)."""
    from vkd_pyro.config import config_from_dict
    from vkd_pyro.training.loop import fit

    cache = tmp_path_factory.getbasetemp() / f"{name}-cache"
    folder = tmp_path_factory.mktemp("trained") / "run"
    fit(config_from_dict({}, "tiny", tiny_overrides() + [f"cache_dir={cache}"]), folder, progress=False)
    return folder


def copy_run(folder: Path, tmp_path: Path) -> Path:
    """A copy of a trained run's folder as `tmp_path`/run, for a test to edit."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(folder, copy)
    return copy
