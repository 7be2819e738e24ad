"""Checkpoint files: atomic writes, weights_only reads, RNG states, and the speed options' effect on weights."""

import random
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from torch import nn

import vkd_pyro.training.checkpoint as checkpoint
from vkd_pyro.config import load_config
from vkd_pyro.errors import UserError
from vkd_pyro.training.accel import apply_speed_options, autocast_forward
from vkd_pyro.training.build import build_module
from vkd_pyro.training.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    load_resume_state,
    restore_rng_state,
    save_atomic,
)


def test_save_atomic_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"step": torch.tensor(1)}, path)
    save_atomic({"step": torch.tensor(2)}, path)
    assert load_checkpoint(path)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"step": torch.tensor(1)}, path)

    def crash(obj, f):  # half a file, then the process dies (here: an exception)
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError):
        save_atomic({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class Foreign:
    """An arbitrary class: weights_only refuses to unpickle it."""


def test_checkpoints_are_read_with_weights_only(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": Foreign()}, path)
    with pytest.raises(UserError, match="not a readable vkd-pyro checkpoint"):
        load_checkpoint(path)
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04")
    with pytest.raises(UserError, match="truncated.pt: not a readable"):
        load_checkpoint(tmp_path / "truncated.pt")


def draws():
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)],
            pyro.sample("x", pyro.distributions.Normal(0.0, 1.0)).item())


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    pyro.set_rng_seed(5)
    draws()
    np.random.randn()  # a cached Gaussian in numpy's state
    save_atomic({"rng": [capture_rng_state()]}, tmp_path / "rng.pt")
    expected = draws()
    assert draws() != expected  # the generators moved on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"][0])
    assert draws() == expected


def test_resume_state_must_be_complete(tmp_path):
    save_atomic({"format": 1, "module": {}}, tmp_path / "last.pt")
    with pytest.raises(UserError, match="missing optimizer"):
        load_resume_state(tmp_path)
    with pytest.raises(UserError, match="run folder not found"):
        load_resume_state(tmp_path / "absent")


# --------------------------------------------------------------------------- speed options


def tiny(*overrides):
    return load_config(None, ["model.z_dim=8", "model.hidden=[8]", "image_encoder.width=4",
                              "image_encoder.out_features=8", "inference.objective=image_only", *overrides])


def test_bf16_autocast_keeps_weights_float32_and_the_same_state_dict():
    plain, mixed = build_module(tiny()), build_module(tiny("train.amp=bf16"))
    assert plain.state_dict().keys() == mixed.state_dict().keys()
    mixed.load_state_dict(plain.state_dict())
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    images = torch.rand(4, 1, 32, 32)
    plain.eval(), mixed.eval()
    a, b = plain.model.image_encoder(images), mixed.model.image_encoder(images)
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # computed in bf16, returned as float32
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)


def test_autocast_forward_runs_the_module_in_bfloat16():
    seen = []
    inner = nn.Linear(4, 3)
    inner.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    layer = autocast_forward(nn.Sequential(inner), torch.bfloat16)
    out = layer(torch.randn(2, 4))
    assert seen == [torch.bfloat16] and out.dtype == torch.float32


def test_channels_last_option_sets_the_backbone_layout():
    module = build_module(tiny("image_encoder.name=densenet121", "image_encoder.channels_last=true"))
    conv = module.model.image_encoder.features.denseblock1.denselayer1.conv2.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    module = build_module(tiny("image_encoder.name=densenet121"))
    assert module.model.image_encoder.features.denseblock1.denselayer1.conv2.weight.is_contiguous()
    apply_speed_options(module, channels_last=True)
    assert module.model.image_encoder.features.denseblock1.denselayer1.conv2.weight.is_contiguous(memory_format=torch.channels_last)
