"""Bad configs and bad arguments through the command line: one line naming the key and the file, status 2.

Each case runs `vkd_pyro.cli.main([...])` (the `vkd-pyro` entry point) and reads its stderr. Config
mistakes are found before any data is read, so these tests take milliseconds.
"""

import pytest
import yaml

from vkd_pyro.cli import main


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("vkd-pyro: error: ")
    return lines[0]


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"max_reports": 40, "image_size": 32},
                                    "model": {"z_dim": 16, "hidden": [16]}}))
    return path


@pytest.mark.parametrize("overrides, key, words", [
    (["model.zdim=3"], "model.zdim", "unknown key"),
    (["trainn.lr=0.1"], "trainn", "unknown key"),
    (["train.batch_size=abc"], "train.batch_size", "expected int"),
    (["train.lr=fast"], "train.lr", "expected float"),
    (["train.progress=maybe"], "train.progress", "expected bool"),
    (["inference.num_particles=0"], "inference.num_particles", "must be > 0"),
    (["inference.prior_samples=-1"], "inference.prior_samples", "must be > 0"),
    (["inference.test_samples=0"], "inference.test_samples", "must be > 0"),
    (["model.z_dim=0"], "model.z_dim", "must be > 0"),
    (["model.z_dim=-8"], "model.z_dim", "must be > 0"),
    (["model.dropout=1.5"], "model.dropout", "must be in [0, 1)"),
    (["text_encoder.dropout=-0.1"], "text_encoder.dropout", "must be in [0, 1)"),
    (["inference.annealing.R=2"], "inference.annealing.R", "must be in (0, 1]"),
    (["inference.objective=full"], "inference.objective", "unknown objective 'full'"),
    (["image_encoder.name=resnet50"], "image_encoder.name", "must be one of"),
    (["data.name=nih_v2"], "data.name", "must be one of"),
    (["model.prior=gamma"], "model.prior", "unknown prior 'gamma'"),
    (["model.guide=flow", "model.guide_options={bogus: 1}"], "model.guide_options", "takes no option 'bogus'"),
    (["train.amp=fp16"], "train.amp", "must be one of"),
    (["train.grad_clip=0"], "train.grad_clip", "must be > 0"),
    (["train.checkpoint_every=0"], "train.checkpoint_every", "must be > 0"),
    (["device=tpu"], "device", "must be one of"),
])
def test_bad_override_is_one_line_naming_file_and_key(config_file, capsys, overrides, key, words):
    code, err = run_cli(["train", "--config", str(config_file), *overrides], capsys)
    assert code == 2
    line = one_error_line(err)
    assert f"{config_file}: {key}:" in line and words in line


@pytest.mark.parametrize("content, key, words", [
    ({"model": {"z_dim": 0}}, "model.z_dim", "must be > 0"),
    ({"inference": {"num_particles": 2.5}}, "inference.num_particles", "expected int"),
    ({"train": {"patience": "three"}}, "train.patience", "expected int"),
    ({"data": {"split": [0.5, 0.7, -0.2]}}, "data.split", "three positive fractions"),
    ({"modle": {"z_dim": 4}}, "modle", "unknown key"),
])
def test_bad_value_in_the_file_names_file_and_key(tmp_path, capsys, content, key, words):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    code, err = run_cli(["train", "--config", str(path)], capsys)
    assert code == 2
    line = one_error_line(err)
    assert f"{path}: {key}:" in line and words in line


def test_missing_and_malformed_config_files(tmp_path, capsys):
    code, err = run_cli(["train", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "nope.yaml: config file not found" in one_error_line(err)
    bad = tmp_path / "broken.yaml"
    bad.write_text("train: [1, 2\n")
    code, err = run_cli(["train", "--config", str(bad)], capsys)
    assert code == 2 and "broken.yaml: not valid YAML at line" in one_error_line(err)


def test_resume_arguments_are_checked(tmp_path, capsys, config_file):
    code, err = run_cli(["train", "--resume", str(tmp_path / "no-such-run")], capsys)
    assert code == 2 and "no-such-run: run folder not found" in one_error_line(err)
    code, err = run_cli(["train"], capsys)
    assert code == 2 and "--config FILE" in one_error_line(err)
    code, err = run_cli(["train", "--resume", str(tmp_path), "--config", str(config_file)], capsys)
    assert code == 2 and "leave out --config" in one_error_line(err)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_file.read_text())
    code, err = run_cli(["train", "--resume", str(run), "model.z_dim=32"], capsys)
    assert code == 2 and "model.z_dim: cannot be changed when resuming" in one_error_line(err)
    code, err = run_cli(["train", "--resume", str(run), "train.max_epochs=5"], capsys)
    assert code == 2 and "last.pt: no resume state" in one_error_line(err)
