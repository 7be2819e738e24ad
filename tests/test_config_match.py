"""A run is what it trained with (issue #19, class 1).

checkpoint.pt and last.pt carry the config they were trained with; every reader of the weights
(evaluate, predict, diagnose, figures, `load_run`, `train --resume`) compares it with config.yaml and
refuses a difference outside the run-time keys in one line naming the keys, before anything is
built or written. The memory that evaluating or predicting implies (image size, batch, samples) is
estimated before it is allocated and refused in one line when it cannot fit (available memory
monkeypatched). One tiny run is trained once; each case edits a copy of its folder.
"""

from pathlib import Path

import pytest
import torch
import yaml

import vkd_pyro.training.memory as memory
from tests.test_run_folder import cli, one_line, snapshot
from tests.tiny_runs import copy_run, tiny_overrides, write_config_file
from vkd_pyro import load_run
from vkd_pyro.config import config_from_dict
from vkd_pyro.errors import UserError
from vkd_pyro.training.config_match import RUN_TIME_KEYS, config_differences
from vkd_pyro.training.run_folder import flatten

MiB = 2**20


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def run(tmp_path, tiny_trained_run):
    return copy_run(tiny_trained_run, tmp_path)


@pytest.fixture
def image(tmp_path):
    from PIL import Image
    path = tmp_path / "x.png"
    Image.new("L", (32, 32), 128).save(path)
    return path


def edit(run: Path, **changes) -> None:
    """Set dotted keys (`data__split_seed=1`) in the run's config.yaml, as a user's editor would."""
    path = run / "config.yaml"
    config = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(config))


# Edits that make config.yaml describe another run than its weights, and what the line must say.
EDITS = {
    "split_seed": ({"data__split_seed": 1}, "data.split_seed: 0 in checkpoint.pt, 1 in config.yaml"),
    "z_dim": ({"model__z_dim": 32}, "model.z_dim: 16 in checkpoint.pt, 32 in config.yaml"),
    "image_size": ({"data__image_size": 64}, "data.image_size: 32 in checkpoint.pt, 64 in config.yaml"),
}


# --------------------------------------------------------------------------- the comparison itself


@pytest.mark.parametrize("key, value", [("device", "auto"), ("data.num_workers", 3), ("train.eval_batch_size", 7),
                                        ("train.max_epochs", 9), ("data.root", "/data/moved/openi")])
def test_run_time_keys_are_not_differences(key, value):
    base = config_from_dict({}).to_dict()
    changed = config_from_dict({}, overrides=[f"{key}={value}"]).to_dict()
    assert key in RUN_TIME_KEYS and flatten(changed)[key] == value != flatten(base)[key]
    assert config_differences(base, changed) == []


@pytest.mark.parametrize("overrides, expected", [
    (["data.split_seed=3", "device=auto"], [("data.split_seed", 0, 3)]),
    (["model.hidden=[8, 8]", "model.z_dim=4", "train.lr=0.5"], [("model.hidden", [512, 512], [8, 8]),
                                                                ("model.z_dim", 512, 4)]),
])
def test_differences_are_the_other_keys_with_both_values(overrides, expected):
    base = config_from_dict({}).to_dict()
    assert config_differences(base, config_from_dict({}, overrides=overrides).to_dict()) == expected


def test_a_key_only_one_side_holds_is_not_compared():
    """A key added to the schema after the weights were written (or removed since) is no difference."""
    base = config_from_dict({}).to_dict()
    older = {**base, "data": {k: v for k, v in base["data"].items() if k != "split_seed"}}
    assert config_differences(older, config_from_dict({}, overrides=["data.split_seed=5"]).to_dict()) == []
    assert config_differences(base, older) == []


# --------------------------------------------------------------------------- readers of checkpoint.pt


def test_checkpoint_holds_the_resolved_config_it_was_trained_with(tiny_trained_run):
    config = torch.load(tiny_trained_run / "checkpoint.pt", weights_only=True)["config"]
    expected = config_from_dict({}, "tiny", tiny_overrides()).to_dict()
    assert config["data"]["split_seed"] == 0 and config["model"]["z_dim"] == 16
    assert config_differences(config, expected) == []  # every key, defaults included
    assert set(config) == set(expected)


@pytest.mark.parametrize("name", list(EDITS))
def test_evaluate_refuses_an_edited_config_and_writes_nothing(run, capsys, name):
    changes, expected = EDITS[name]
    edit(run, **changes)
    before = snapshot(run)
    code, out, err = cli(["evaluate", "--run", run], capsys)
    line = one_line(err)
    assert code == 2 and f"{run / 'config.yaml'}: does not match the weights in {run / 'checkpoint.pt'}" in line
    assert expected in line and "put config.yaml back" in line, line
    assert snapshot(run) == before  # metrics.json and predictions_test.npz byte for byte


@pytest.mark.parametrize("command", ["predict", "diagnose", "figures"])
@pytest.mark.parametrize("name", ["split_seed", "image_size"])
def test_every_cli_reader_refuses_an_edited_config(run, image, capsys, command, name):
    changes, expected = EDITS[name]
    edit(run, **changes)
    before = snapshot(run)
    argv = [command, "--run", run] + ([image] if command == "predict" else [])
    code, out, err = cli(argv, capsys)
    assert code == 2 and expected in one_line(err)
    assert snapshot(run) == before


@pytest.mark.parametrize("checkpoint, weights", [("best", "checkpoint.pt"), ("last", "last.pt")])
def test_gradients_refuses_an_edited_config_for_either_checkpoint(run, tmp_path, capsys, checkpoint, weights):
    changes, expected = EDITS["split_seed"]
    edit(run, **changes)
    code, out, err = cli(["gradients", "--run", run, "--checkpoint", checkpoint, "--batches", "2", "--repeats", "2",
                          "--out", tmp_path / "g"], capsys)
    assert code == 2 and f"does not match the weights in {run / weights}" in one_line(err)
    assert expected.replace("checkpoint.pt", weights) in err
    assert not (tmp_path / "g" / "gradients.csv").exists()


@pytest.mark.parametrize("name", list(EDITS))
def test_load_run_refuses_an_edited_config(run, name):
    changes, expected = EDITS[name]
    edit(run, **changes)
    with pytest.raises(UserError, match="^" + str(run / "config.yaml")) as info:
        load_run(run)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_many_differences_are_named_in_one_line(run):
    edit(run, data__split_seed=1, data__image_size=64, model__z_dim=32, model__dropout=0.25, seed=4)
    with pytest.raises(UserError) as info:
        load_run(run)
    message = str(info.value)
    assert "\n" not in message
    assert "data.image_size: 32 in checkpoint.pt, 64 in config.yaml; data.split_seed: 0" in message
    assert "model.dropout: 0.5 in checkpoint.pt, 0.25 in config.yaml; and 2 more: model.z_dim, seed" in message


@pytest.mark.parametrize("changes", [{"device": "auto"}, {"data__num_workers": 2}, {"train__max_epochs": 9},
                                     {"train__eval_batch_size": 5, "train__progress": True}])
def test_run_time_edits_are_accepted(run, capsys, changes):
    edit(run, **changes)
    code, out, err = cli(["evaluate", "--run", run, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "wrote " in out


def test_a_checkpoint_without_a_config_has_nothing_to_compare(run):
    """Written before checkpoints carried their config: loaded as it is (the run id still binds it)."""
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({k: v for k, v in checkpoint.items() if k != "config"}, run / "checkpoint.pt")
    edit(run, train__eval_batch_size=7)
    assert load_run(run).config.train.eval_batch_size == 7
    torch.save({**checkpoint, "config": ["not", "a", "mapping"]}, run / "checkpoint.pt")
    with pytest.raises(UserError, match=r"checkpoint\.pt: not a vkd-pyro checkpoint \(its config is not a mapping\)"):
        load_run(run)


# --------------------------------------------------------------------------- train --resume


@pytest.mark.parametrize("changes, expected", [
    ({"data__split_seed": 1}, "data.split_seed: 0 in last.pt, 1 in config.yaml"),
    ({"data__image_size": 64}, "data.image_size: 32 in last.pt, 64 in config.yaml"),
    ({"inference__test_samples": 8, "train__max_epochs": 3}, "inference.test_samples: 2 in last.pt, 8 in config.yaml"),
])
def test_resume_refuses_an_edited_config_naming_the_key(run, capsys, changes, expected):
    edit(run, **changes)
    before = snapshot(run)
    code, out, err = cli(["train", "--resume", run], capsys)
    line = one_line(err)
    assert code == 2 and f"{run / 'config.yaml'}: does not match the weights in {run / 'last.pt'}" in line
    assert expected in line and "train.max_epochs" not in line, line
    assert snapshot(run) == before


# --------------------------------------------------------------------------- memory


def available(monkeypatch, size: int) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: size)


@pytest.mark.parametrize("encoder, per_pixel, features", [("small_cnn", 2 + 2 * 8, 32), ("densenet121", 64, 1024)])
def test_the_estimate_is_the_documented_formula(encoder, per_pixel, features):
    config = config_from_dict({}, "tiny", tiny_overrides() + [f"image_encoder.name={encoder}"])
    batch, samples = 3, 5
    images = 4 * batch * 32 * 32 * (1 + per_pixel)
    draws = 4 * samples * batch * (2 * 16 + features + 16 + 2 * 14) * 2
    assert memory.estimate_bytes(config, batch, samples) == images + draws


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_too_many_samples_is_refused_before_allocation(run, image, capsys, monkeypatch, command):
    available(monkeypatch, 64 * MiB)
    before = snapshot(run)
    argv = ["evaluate", "--run", run] if command == "evaluate" else ["predict", "--run", run, image]
    code, out, err = cli([*argv, "--samples", 10**6], capsys)
    line = one_line(err)
    assert code == 2 and f"--samples {10**6}: a batch of " in line and "at data.image_size 32" in line
    assert "and cpu has 0.0625 GiB available" in line
    assert "lower --samples (at most about " in line and "with this batch)" in line, line
    assert snapshot(run) == before


@pytest.mark.parametrize("samples_key, samples", [("inference.test_samples", None), ("samples", 3)])
def test_a_batch_too_large_is_refused_and_a_smaller_one_predicts(run, monkeypatch, samples_key, samples):
    """64 images at 32 px through the small CNN (width 8): 64 x 1024 x 19 x 4 bytes, about 5 MB."""
    loaded = load_run(run)
    images = torch.full((64, 1, 32, 32), 0.5)
    available(monkeypatch, MiB)
    with pytest.raises(UserError) as info:
        loaded.predict(images, samples=samples, batch_size=64)
    message = str(info.value)
    assert message.startswith(f"{samples_key} {samples or 2}: a batch of 64 images (batch_size) at data.image_size 32")
    most = int(message.split("batch_size (at most about ")[1].split()[0])
    assert 4 <= most < 64 and memory.estimate_bytes(loaded.config, most, samples or 2) <= MiB
    prediction = loaded.predict(images, samples=samples, batch_size=most)
    assert prediction.probability.shape == (64, 14)


def test_run_evaluate_checks_the_memory_of_its_batch(run, monkeypatch):
    loaded = load_run(run)
    available(monkeypatch, MiB)
    with pytest.raises(UserError, match=r"^samples 100000: a batch of \d+ images \(train\.eval_batch_size\)"):
        loaded.evaluate("test", samples=100000)


@pytest.mark.parametrize("override", ["inference.test_samples=100000", "train.eval_batch_size=1000000"])
def test_training_checks_the_memory_of_its_evaluation_before_claiming_a_folder(tmp_path, capsys, monkeypatch, override):
    available(monkeypatch, 64 * MiB)
    config = write_config_file(tmp_path / "tiny.yaml", tiny_overrides() + [f"cache_dir={tmp_path / 'cache'}", override])
    code, out, err = cli(["train", "--config", config, "--out", tmp_path / "run"], capsys)
    line = one_line(err)
    assert code == 2 and "a batch of " in line and "(train.eval_batch_size)" in line and "cpu has 0.0625 GiB" in line
    assert "inference.test_samples " in line and ("lower inference.test_samples" in line or "lower train.eval_batch_size" in line)
    assert not (tmp_path / "run").exists()
