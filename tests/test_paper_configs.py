"""The paper's configurations (configs/openi.yaml, mimic_cxr.yaml, chestxray14_finetune.yaml) load and
validate with the settings of Sec. 4.2, and building their networks without the pretrained weights
on the machine fails with the clear offline message instead of downloading anything."""

import socket

import pytest

from vkd_pyro.cli import main
from vkd_pyro.config import load_config
from vkd_pyro.errors import UserError
from vkd_pyro.training.build import build_module

PAPER_CONFIGS = ["openi", "mimic_cxr", "chestxray14_finetune"]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network, an empty torch.hub folder and an empty Hugging Face cache."""
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_settings(name):
    config = load_config(f"configs/{name}.yaml")
    assert config.data.name == name.removesuffix("_finetune") and config.data.image_size == 224
    assert (config.image_encoder.name, config.image_encoder.weights) == ("densenet121", "imagenet")
    assert (config.model.z_dim, config.model.hidden, config.model.dropout) == (512, [512, 512], 0.5)
    assert (config.train.tolerance, config.train.patience) == (0.01, 3)
    assert (config.inference.annealing.schedule, config.inference.annealing.R, config.inference.annealing.C) == \
        ("cyclical", 0.5, 4)
    if name == "chestxray14_finetune":
        assert config.inference.objective == "image_only" and config.init_from is None
        assert config.data.eval_classes == ["Cardiomegaly", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                                            "Pneumothorax", "Pleural Effusion"]
    else:
        assert config.inference.objective == "vkd" and config.data.eval_classes is None
        text = config.text_encoder
        assert (text.name, text.max_tokens, text.block_width) == ("emilyalsentzer/Bio_ClinicalBERT", 256, None)
        assert (config.data.label_policy, config.data.blank_policy) == ("zeros", "zeros")


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_building_offline_fails_clearly_instead_of_downloading(name, offline):
    config = load_config(f"configs/{name}.yaml")
    dims = {"hidden_size": 768, "num_heads": 12, "intermediate_size": 3072}  # ClinicalBERT's
    with pytest.raises(UserError) as error:
        build_module(config, dims)
    message = str(error.value)
    assert "ImageNet DenseNet-121 weights are not on this machine and cannot be downloaded" in message
    assert "put densenet121-a639ec97.pth" in message and f"into {offline / 'torch' / 'hub' / 'checkpoints'}/" in message
    if config.inference.objective != "image_only":
        from vkd_pyro.encoders.text import FrozenTextEncoder

        with pytest.raises(UserError, match="'emilyalsentzer/Bio_ClinicalBERT' is not available offline .*"
                                            "huggingface-cli download emilyalsentzer/Bio_ClinicalBERT"):
            FrozenTextEncoder(config.text_encoder.name)


def test_training_with_the_paper_config_stops_with_one_line_offline(offline, tmp_path, capsys):
    from data_fixtures import build_openi

    fx = build_openi(tmp_path / "openi", numbers=tuple(range(1, 13)))
    code = main(["train", "--config", "configs/openi.yaml", "--out", str(tmp_path / "run"), f"data.root={fx.root}",
                 f"data.reports={fx.files['reports']}", f"cache_dir={tmp_path / 'c'}", "data.image_size=32",
                 "data.num_workers=0", "device=cpu", "train.progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "text model 'emilyalsentzer/Bio_ClinicalBERT' is not available offline" in err
