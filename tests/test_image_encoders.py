"""Image encoders: shapes, the grey-channel equivalence of densenet121, offline weight handling."""

import socket
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision

from vkd_pyro.encoders import image as image_mod
from vkd_pyro.encoders.image import (
    IMAGE_ENCODERS,
    IMAGENET_GREY_MEAN,
    IMAGENET_GREY_STD,
    build_image_encoder,
)
from vkd_pyro.errors import UserError


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test here fails if anything tries to open a network connection."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _random_torchvision_densenet(seed=0):
    """A torchvision RGB densenet121 with random weights AND random BN statistics, in eval mode."""
    torch.manual_seed(seed)
    model = torchvision.models.densenet121(weights=None)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _rgb_reference(model, x):
    """torchvision's RGB densenet features on the grey image normalised once and replicated 3x."""
    n = (x - IMAGENET_GREY_MEAN) / IMAGENET_GREY_STD
    out = F.relu(model.features(n.repeat(1, 3, 1, 1)))
    return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


def test_small_cnn_shapes_and_options():
    enc = build_image_encoder("small_cnn")
    assert enc.out_features == 128
    assert enc(torch.rand(3, 1, 64, 64)).shape == (3, 128)
    enc = build_image_encoder("small_cnn", width=4, out_features=40)
    assert enc.out_features == 40
    assert enc(torch.rand(2, 1, 32, 48)).shape == (2, 40)
    with pytest.raises(ValueError):
        enc(torch.rand(2, 3, 32, 32))  # RGB input is refused: encoders take one grey channel


def test_densenet121_shape():
    enc = build_image_encoder("densenet121")
    assert enc.out_features == 1024
    with torch.no_grad():
        assert enc.eval()(torch.rand(2, 1, 64, 64)).shape == (2, 1024)


def test_densenet121_grey_equals_rgb_replicated(tmp_path):
    model = _random_torchvision_densenet()
    path = tmp_path / "tv_densenet121.pth"
    torch.save(model.state_dict(), path)
    enc = build_image_encoder("densenet121", weights=str(path)).eval()
    assert enc.features.conv0.weight.shape == (64, 1, 7, 7)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        got, ref = enc(x), _rgb_reference(model, x)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), (got - ref).abs().max()
    # The summed filters matter: a 1-channel conv0 using the red filters alone gives something else.
    enc.features.conv0.weight.data = model.features.conv0.weight.data[:, :1].clone()
    with torch.no_grad():
        assert not torch.allclose(enc(x), ref, rtol=1e-3, atol=1e-4)


def test_encoder_state_dict_round_trip(tmp_path):
    enc = build_image_encoder("densenet121").eval()
    enc.input_mean.fill_(0.3)
    path = tmp_path / "enc.pt"
    torch.save(enc.state_dict(), path)
    again = build_image_encoder("densenet121", weights=str(path)).eval()
    assert float(again.input_mean) == pytest.approx(0.3)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(enc(x), again(x))

    cnn = build_image_encoder("small_cnn").eval()
    cnn_path = tmp_path / "cnn.pt"
    torch.save(cnn.state_dict(), cnn_path)
    cnn2 = build_image_encoder("small_cnn", weights=str(cnn_path)).eval()
    with torch.no_grad():
        assert torch.equal(cnn(x), cnn2(x))


def test_imagenet_weights_read_from_torch_hub_dir(tmp_path, monkeypatch):
    """The ImageNet file, in torchvision's old `norm.1` key style, is found under $TORCH_HOME."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = _random_torchvision_densenet(seed=1)
    old_style = OrderedDict()  # like the real file: `norm.1` keys, no num_batches_tracked
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        for part in ("norm", "relu", "conv"):
            key = key.replace(f".{part}1.", f".{part}.1.").replace(f".{part}2.", f".{part}.2.")
        old_style[key] = value
    assert any(".norm.1." in k for k in old_style)
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(old_style, folder / "densenet121-a639ec97.pth")
    enc = build_image_encoder("densenet121", weights="imagenet").eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(enc(x), _rgb_reference(model, x), rtol=1e-4, atol=1e-5)


def test_imagenet_missing_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as err:
        build_image_encoder("densenet121", weights="imagenet")
    message = str(err.value)
    assert "densenet121-a639ec97.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "\n" not in message


def test_xrv_missing_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    file, _ = image_mod.xrv_weights_file()
    with pytest.raises(UserError) as err:
        build_image_encoder("densenet121", weights="xrv")
    assert file.name in str(err.value)
    assert str(tmp_path / ".torchxrayvision" / "models_data") in str(err.value)
    assert not file.exists()  # nothing was downloaded or created


def test_xrv_weights_loaded_through_torchxrayvision(tmp_path, monkeypatch):
    """A (random) torchxrayvision model saved where xrv looks: same features, xrv's [-1024, 1024] scaling."""
    import torchxrayvision as xrv

    monkeypatch.setenv("HOME", str(tmp_path))
    file, _ = image_mod.xrv_weights_file()
    file.parent.mkdir(parents=True)
    torch.manual_seed(2)
    model = xrv.models.DenseNet(weights=None).eval()
    torch.save(model, file)
    enc = build_image_encoder("densenet121", weights="xrv").eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ref = model.features2(x * 2048.0 - 1024.0)
        assert torch.allclose(enc(x), ref, rtol=1e-4, atol=1e-5)


def test_missing_and_wrong_weight_files(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match="nope.pth"):
        build_image_encoder("densenet121", weights=str(missing))
    with pytest.raises(UserError, match="nope.pth"):
        build_image_encoder("small_cnn", weights=str(missing))

    wrong = tmp_path / "wrong.pt"
    torch.save(build_image_encoder("small_cnn").state_dict(), wrong)
    with pytest.raises(UserError, match="wrong.pt"):
        build_image_encoder("densenet121", weights=str(wrong))

    partial = tmp_path / "partial.pt"
    state = _random_torchvision_densenet().state_dict()
    state.pop("features.norm5.weight")
    torch.save(state, partial)
    with pytest.raises(UserError, match="partial.pt"):
        build_image_encoder("densenet121", weights=str(partial))

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="garbage.pt"):
        build_image_encoder("small_cnn", weights=str(garbage))

    with pytest.raises(UserError, match="small_cnn"):
        build_image_encoder("small_cnn", weights="imagenet")


def test_unknown_name_and_option():
    with pytest.raises(UserError) as err:
        build_image_encoder("resnet9000")
    for name in IMAGE_ENCODERS:
        assert name in str(err.value)
    with pytest.raises(UserError, match="colour"):
        build_image_encoder("small_cnn", colour=True)
