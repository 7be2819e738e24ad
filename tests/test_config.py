"""Config loading: defaults, dotted overrides, and one clear line for each kind of mistake."""

import pytest

from vkd_pyro.config import Config, config_from_dict, load_config, save_config
from vkd_pyro.errors import ConfigError


def test_defaults_follow_the_paper():
    config = Config()
    assert config.model.z_dim == 512 and config.model.hidden == [512, 512] and config.model.dropout == 0.5
    assert config.inference.annealing.R == 0.5 and config.inference.annealing.C == 4
    assert config.text_encoder.max_tokens == 256 and config.train.tolerance == 0.01


def test_demo_config_loads_and_round_trips(tmp_path):
    config = load_config("configs/demo.yaml")
    assert config.data.name == "openi_phantom" and config.inference.objective == "vkd"
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


def test_dotted_overrides_are_typed():
    config = config_from_dict({}, overrides=["inference.objective=no_mi", "train.lr=1e-4", "model.hidden=[64, 32]",
                                             "data.max_reports=40", "inference.annealing.schedule=constant"])
    assert config.inference.objective == "no_mi"
    assert config.train.lr == pytest.approx(1e-4) and isinstance(config.train.lr, float)
    assert config.model.hidden == [64, 32] and config.data.max_reports == 40
    assert config.inference.annealing.schedule == "constant"


@pytest.mark.parametrize("values, overrides, message", [
    ({"model": {"zdim": 3}}, [], "model.zdim: unknown key"),
    ({}, ["train.batch_size=abc"], "train.batch_size: expected int"),
    ({}, ["inference.num_particles=0"], "inference.num_particles: 0 must be > 0"),
    ({}, ["model.z_dim=-4"], "model.z_dim: -4 must be > 0"),
    ({}, ["model.dropout=1.5"], "model.dropout: 1.5 must be in [0, 1)"),
    ({}, ["inference.objective=full"], "inference.objective: 'full' must be one of vkd, no_mi, image_only"),
    ({}, ["data.split=[0.5, 0.5]"], "data.split"),
    ({"train": 3}, [], "train: expected a mapping"),
    ({}, ["trainn.lr=1"], "trainn: unknown key"),
    ({}, ["train.progress=maybe"], "train.progress: expected bool"),
])
def test_mistakes_name_the_source_and_key(values, overrides, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(values, "my.yaml", overrides)
    text = str(err.value)
    assert text.startswith("my.yaml: ") and message in text and "\n" not in text


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML at line"):
        load_config(bad)
