"""Config loading: defaults, dotted overrides, and one clear line for each kind of mistake."""

import re
from pathlib import Path

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
    ({}, ["inference.objective= "], "inference.objective: '' must name an objective"),
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


LAUGHS = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "x"] * 10) + "]\n" for i in range(9))


@pytest.mark.parametrize("content, message", [
    ("- train\n- model\n", "(top level): expected a mapping of sections"),
    ("just words\n", "(top level): expected a mapping of sections"),
    ("train:\n  lr: 0.1\n  lr: 0.2\n", "train.lr: duplicate key (lines 2 and 3)"),
    ("seed: 1\nseed: 1\n", "seed: duplicate key (lines 1 and 2)"),
    ("seed: 100000000000000000000000000000000000000\n", "seed: 100000...(39 digits) does not fit in a 64-bit integer"),
    ("train:\n  max_epochs: 9223372036854775808\n", "train.max_epochs: 9223372036854775808 does not fit in a 64-bit"),
    ("train:\n  lr: 1" + "0" * 400 + "\n", "train.lr: 100000...(401 digits) does not fit"),
    ("train:\n  lr: .nan\n", "train.lr: nan is not a finite number"),
    ("train:\n  tolerance: -.inf\n", "train.tolerance: -inf is not a finite number"),
    ("train:\n  lr: '1e400'\n", "train.lr: inf is not a finite number"),
    ("data:\n  split: [0.5, .nan, 0.5]\n", "data.split[1]: nan is not a finite number"),
    ("model:\n  prior: lowrank\n  prior_options: {rank: .inf}\n", "model.prior_options.rank: inf is not a finite"),
    ("seed: -1\n", "seed: -1 must be in 0..4294967295"),
    ("seed: 4294967296\n", "seed: 4294967296 must be in 0..4294967295"),
    ("data:\n  split_seed: 4294967296\n", "data.split_seed: 4294967296 must be in 0..4294967295"),
    (LAUGHS, "YAML aliases expand to more than 10000 values"),
    ("a: &a [*a]\n", "a[0]: a YAML alias refers to itself"),
    ("base: &b 1\n" + "".join(f"k{i}: *b\n" for i in range(101)), "more than 100 YAML aliases"),
    ("seed: " + "[" * 3000 + "]" * 3000 + "\n", "YAML nested too deeply"),
    ("train: {lr: 0.1\n", "not valid YAML at line"),
])
def test_bad_files_are_one_line_naming_file_and_key(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text and len(text) < 300


def test_billion_laughs_is_refused_before_expansion(tmp_path, monkeypatch):
    import yaml

    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS)  # 10**9 values once expanded
    monkeypatch.setattr(yaml.SafeLoader, "construct_document",
                        lambda *a: pytest.fail("constructed before the size check"))
    with pytest.raises(ConfigError, match=r"laughs.yaml: l\d: YAML aliases expand"):
        load_config(path)


def test_a_few_aliases_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("model:\n  hidden: &h [32, 16]\n  z_dim: 8\nseed: 4294967295\n"
                    "data:\n  split_seed: 0\n  split: [0.5, 0.25, 0.25]\n")
    config = load_config(path)
    assert config.model.hidden == [32, 16] and config.seed == 2**32 - 1 and config.data.split == [0.5, 0.25, 0.25]


@pytest.mark.parametrize("content", ["", "# only a comment\n", "~\n"])
def test_an_empty_file_is_the_defaults(tmp_path, content):
    path = tmp_path / "empty.yaml"
    path.write_text(content)
    assert load_config(path) == Config()


@pytest.mark.parametrize("data, message", [
    (b"seed: 1\x00\x01\x02\n", "a binary file, not a YAML config"),
    ("seed: 1\ntrain: {lr: 0.1}  # caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at line 2)"),
])
def test_files_that_are_not_utf8_text(tmp_path, data, message):
    path = tmp_path / "bin.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: {message}")):
        load_config(path)
    path.write_bytes("\ufeffseed: 3\n".encode("utf-8"))  # a UTF-8 byte-order mark is fine
    assert load_config(path).seed == 3


def test_folder_and_unreadable_paths(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=f"^{tmp_path}: is a folder, not a config file"):
        load_config(tmp_path)
    path = tmp_path / "locked.yaml"
    path.write_text("seed: 1\n")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_bytes", refuse)
    with pytest.raises(ConfigError, match=f"^{path}: config file cannot be read \\(Permission denied\\)$"):
        load_config(path)


def test_override_values_have_the_same_limits(tmp_path):
    with pytest.raises(ConfigError, match=r"^my.yaml: model.prior_options: a: duplicate key"):
        config_from_dict({}, "my.yaml", ["model.prior_options={a: 1, a: 2}"])
    with pytest.raises(ConfigError, match=r"^my.yaml: train.lr: nan is not a finite number"):
        config_from_dict({}, "my.yaml", ["train.lr=.nan"])
    with pytest.raises(ConfigError, match=r"^my.yaml: train.lr: inf is not a finite number"):
        config_from_dict({}, "my.yaml", ["train.lr=1e999"])
    with pytest.raises(ConfigError, match=r"^my.yaml: data.split_seed: -3 must be in 0..4294967295"):
        config_from_dict({}, "my.yaml", ["data.split_seed=-3"])


def test_an_empty_cache_variable_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("VKD_PYRO_CACHE", "  ")
    with pytest.raises(ConfigError, match="^VKD_PYRO_CACHE: the environment variable is set but empty"):
        load_config(None)
    with pytest.raises(ConfigError, match="^VKD_PYRO_CACHE: "):
        Config().resolved_cache_dir()
    assert load_config(None, [f"cache_dir={tmp_path}"]).resolved_cache_dir() == tmp_path  # not consulted
    monkeypatch.setenv("VKD_PYRO_CACHE", str(tmp_path / "c"))
    assert Config().resolved_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("VKD_PYRO_CACHE")
    assert Config().resolved_cache_dir() == Path("~/.cache/vkd-pyro").expanduser()
