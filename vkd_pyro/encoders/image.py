"""Image encoders: a grayscale X-ray batch (B, 1, H, W), float in [0, 1], to features (B, F).

Every encoder built here takes the image as one grey channel with values in [0, 1] (0 black, 1
white), does its own input normalisation inside `forward`, and returns one feature vector per
image. The module carries `out_features: int` (F). Build one by name with `build_image_encoder`:

- `densenet121`: the paper's backbone (Sec. 4.2), torchvision's DenseNet-121 `features` followed by
  ReLU and global average pooling: F = 1024. Its first convolution takes ONE channel. Pretrained
  RGB first-layer filters W (64, 3, 7, 7) are summed over the colour dimension to W' (64, 1, 7, 7),
  and the grey image g is normalised with one grey-level ImageNet mean and std,
  n = (g - 0.449) / 0.226 (the averages of ImageNet's per-channel means 0.485, 0.456, 0.406 and
  stds 0.229, 0.224, 0.225). Because conv(W, [n, n, n]) = conv(sum_c W_c, n), zero padding
  included, this is exactly the RGB network fed the normalised grey image replicated to 3
  channels, at a third of the first layer's cost.
  `weights`: `none` (random init), `imagenet` (torchvision's IMAGENET1K_V1 file, read from
  torch.hub's checkpoint folder, never downloaded), `xrv` (torchxrayvision's chest X-ray
  DenseNet-121 `densenet121-res224-all`, read from ~/.torchxrayvision/models_data/, never
  downloaded; its input scaling [-1024, 1024] is applied inside forward as 2048 * g - 1024; it was
  trained at 224 x 224), or the path of a state dict (.pt/.pth) of a torchvision densenet121 or of
  this encoder.
- `small_cnn`: a fast 4-block CNN for the CPU demo (conv3x3-BN-ReLU-maxpool with widths
  w, 2w, 4w, F; defaults w = 16, F = 128), then global average pooling. `weights`: `none` or the
  path of a state dict of this encoder.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from vkd_pyro.errors import UserError


def _ignores_every_warning(entry: tuple) -> bool:
    """Whether a `warnings.filters` entry (action, message, category, module, lineno) ignores every
    warning of vkd-pyro's classes (UserWarning and below) from every module."""
    action, message, category, module, _ = entry
    return action == "ignore" and message is None and module is None and issubclass(UserWarning, category)


def _import_torchxrayvision():
    """torchxrayvision, imported without silencing this process's warnings.

    Its models module calls `warnings.filterwarnings("ignore")` at import time, which would hide every
    later warning (vkd-pyro's CorruptCacheWarning among them). The filters are saved before the import
    and restored after it; those the import added for its dependencies' own warning classes (urllib3,
    requests) are kept, any that ignores every warning is dropped. Import torchxrayvision only here."""
    saved = warnings.filters[:]
    try:
        import torchxrayvision
    finally:
        added = [entry for entry in warnings.filters if entry not in saved and not _ignores_every_warning(entry)]
        warnings.filters[:] = added + saved
    return torchxrayvision


xrv = _import_torchxrayvision()

# One grey-level ImageNet normalisation: the means of the per-channel RGB means and stds.
IMAGENET_GREY_MEAN = (0.485 + 0.456 + 0.406) / 3.0
IMAGENET_GREY_STD = (0.229 + 0.224 + 0.225) / 3.0
# torchxrayvision's models read pixels scaled to [-1024, 1024]: (g - 0.5) * 2048.
XRV_MEAN = 0.5
XRV_STD = 1.0 / 2048.0
XRV_WEIGHTS_NAME = "densenet121-res224-all"

# torchvision's pre-0.4 DenseNet checkpoints (including the ImageNet file) name layers `norm.1`.
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _check_grey_batch(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"image encoders take a grey batch (B, 1, H, W); got shape {tuple(x.shape)}")


class DenseNet121Encoder(nn.Module):
    """DenseNet-121 on one grey channel: features(normalise(x)) -> ReLU -> global average pool.

    forward(x: (B, 1, H, W) in [0, 1]) -> (B, 1024). The input normalisation
    (x - input_mean) / input_std uses buffers saved with the state dict: the grey-level ImageNet
    statistics by default, (0.5, 1/2048) for torchxrayvision weights.
    """

    out_features = 1024

    def __init__(self, mean: float = IMAGENET_GREY_MEAN, std: float = IMAGENET_GREY_STD,
                 memory_efficient: bool = False):
        super().__init__()
        features = torchvision.models.densenet121(weights=None, memory_efficient=memory_efficient).features
        conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(conv0.weight)  # torchvision's own init for its convolutions
        features.conv0 = conv0
        self.features = features
        self.register_buffer("input_mean", torch.tensor(float(mean)))
        self.register_buffer("input_std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (B, 1024) of a grey batch (B, 1, H, W) with values in [0, 1]."""
        _check_grey_batch(x)
        x = (x - self.input_mean) / self.input_std
        out = F.relu(self.features(x))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


class SmallCNN(nn.Module):
    """Four conv3x3-BN-ReLU-maxpool2 blocks (widths w, 2w, 4w, out_features), global average pool.

    For 64 x 64 inputs the last block sees 8 x 8 and outputs 4 x 4 maps before pooling.

    forward(x: (B, 1, H, W) in [0, 1]) -> (B, out_features); the input is centred as (x - 0.5) / 0.25.
    """

    def __init__(self, width: int = 16, out_features: int | None = None):
        super().__init__()
        if int(width) < 1 or (out_features is not None and int(out_features) < 1):
            raise UserError(f"small_cnn: width and out_features must be positive (got {width}, {out_features})")
        width = int(width)
        self.out_features = int(out_features) if out_features is not None else 8 * width
        widths = [width, 2 * width, 4 * width, self.out_features]
        layers: list[nn.Module] = []
        cin = 1
        for cout in widths:
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        # Channels-last conv weights make every activation channels-last: max pooling and batch
        # norm run about twice as fast on the CPU (forward+backward, batch 64 at 64x64: ~35 ms
        # instead of ~60 ms on 2 cores). Module.to() and load_state_dict keep this layout.
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (B, out_features) of a grey batch (B, 1, H, W) with values in [0, 1]."""
        _check_grey_batch(x)
        out = self.features((x - 0.5) / 0.25)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


# --------------------------------------------------------------------------- weight files


def imagenet_weights_file() -> tuple[Path, str]:
    """Where torchvision's DenseNet121_Weights.IMAGENET1K_V1 file must lie, and its url.

    The file is `$TORCH_HOME/hub/checkpoints/<file name of the url>` (torch.hub.get_dir()), read
    at call time so that TORCH_HOME set later is honoured.
    """
    url = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path), url


def xrv_weights_file(name: str = XRV_WEIGHTS_NAME) -> tuple[Path, str]:
    """Where torchxrayvision looks for the weights `name` (its get_weights), and their url."""
    url = xrv.models.model_urls[name]["weights_url"]
    folder = Path(os.path.expanduser(xrv.utils.get_cache_dir()))
    return folder / os.path.basename(url), url


def _read_state_dict(path: Path) -> dict:
    """A flat dict name -> tensor read from `path` (weights_only), unwrapped from {'state_dict': ...}."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip or safety errors all mean: not a plain state dict
        raise UserError(f"image encoder weights {path}: cannot be read as a PyTorch state dict "
                        f"({type(exc).__name__}); save one with torch.save(model.state_dict(), path)") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"image encoder weights {path}: not a state dict (a dict of tensors); "
                        f"save one with torch.save(model.state_dict(), path)")
    out = {}
    for key, value in obj.items():
        key = key[len("module."):] if key.startswith("module.") else key
        match = _OLD_DENSENET_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def _load_into(module: nn.Module, state: dict, path: Path, optional: tuple[str, ...] = ()) -> None:
    """load_state_dict(strict) except for the `optional` keys; mismatches become a UserError naming `path`."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()[-1].strip()
        raise UserError(f"image encoder weights {path}: do not fit a {type(module).__name__} ({first})") from None
    missing = [k for k in missing if k not in optional]
    if missing or unexpected:
        detail = (f"missing {missing[:3]}" if missing else "") + (" " if missing and unexpected else "") + \
                 (f"unexpected {unexpected[:3]}" if unexpected else "")
        raise UserError(f"image encoder weights {path}: keys do not match a {type(module).__name__} ({detail}); "
                        f"pass a state dict of this encoder or of a torchvision densenet121")


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"image encoder weights {str(path)!r}: no such file; pass none, a known weights "
                        f"name or the path of an existing .pt/.pth state dict")
    return path


def load_densenet121_state(encoder: DenseNet121Encoder, path: str | os.PathLike) -> None:
    """Load a torchvision densenet121 or a DenseNet121Encoder state dict from `path` into `encoder`.

    A torchvision state dict (3-channel conv0) has its conv0 summed over the colour channels, its
    `classifier.*` dropped and the grey-level ImageNet normalisation set; an encoder state dict
    loads as saved (its input_mean/input_std if present).
    """
    path = _require_file(Path(path))
    state = _read_state_dict(path)
    conv0 = state.get("features.conv0.weight")
    if conv0 is None or conv0.dim() != 4 or conv0.shape[1] not in (1, 3):
        raise UserError(f"image encoder weights {path}: not a DenseNet-121 state dict (no 1- or 3-channel "
                        f"features.conv0.weight); pass a torchvision densenet121 or densenet121 encoder state dict")
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    if conv0.shape[1] == 3:
        state["features.conv0.weight"] = conv0.sum(dim=1, keepdim=True)
        state.setdefault("input_mean", torch.tensor(IMAGENET_GREY_MEAN))
        state.setdefault("input_std", torch.tensor(IMAGENET_GREY_STD))
    _load_into(encoder, state, path, optional=("input_mean", "input_std"))


def _load_xrv(encoder: DenseNet121Encoder, name: str = XRV_WEIGHTS_NAME) -> None:
    """Copy torchxrayvision's `name` DenseNet-121 features into `encoder` (file must already be local)."""
    file, url = xrv_weights_file(name)
    if not file.is_file():
        raise UserError(f"torchxrayvision weights {name} are not on this machine and cannot be downloaded: "
                        f"put {file.name} (from {url}) into {file.parent}/, or pass the path of a state dict")
    # The file exists, so torchxrayvision's get_weights returns it without touching the network.
    try:
        model = xrv.models.DenseNet(weights=name)
    except Exception as exc:
        raise UserError(f"torchxrayvision weights {file}: cannot be loaded ({type(exc).__name__}: {exc}); "
                        f"replace the file with the one from {url}") from None
    encoder.features.load_state_dict(model.features.state_dict())
    encoder.input_mean.fill_(XRV_MEAN)
    encoder.input_std.fill_(XRV_STD)


# --------------------------------------------------------------------------- builders


def _build_densenet121(weights: str = "none", memory_efficient: bool = False) -> DenseNet121Encoder:
    encoder = DenseNet121Encoder(memory_efficient=memory_efficient)
    if weights == "none":
        return encoder
    if weights == "imagenet":
        file, url = imagenet_weights_file()
        if not file.is_file():
            raise UserError(f"ImageNet DenseNet-121 weights are not on this machine and cannot be downloaded: "
                            f"put {file.name} (from {url}) into {file.parent}/ (or set TORCH_HOME), "
                            f"or pass the path of a state dict as weights")
        load_densenet121_state(encoder, file)
    elif weights == "xrv":
        _load_xrv(encoder)
    else:
        load_densenet121_state(encoder, weights)
    return encoder


def _build_small_cnn(weights: str = "none", width: int = 16, out_features: int | None = None) -> SmallCNN:
    encoder = SmallCNN(width=width, out_features=out_features)
    if weights in ("imagenet", "xrv"):
        raise UserError(f"image encoder small_cnn has no {weights} weights: use weights none or the path "
                        f"of a small_cnn state dict")
    if weights != "none":
        path = _require_file(Path(weights))
        _load_into(encoder, _read_state_dict(path), path)
    return encoder


IMAGE_ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "densenet121": _build_densenet121,
    "small_cnn": _build_small_cnn,
}


def build_image_encoder(name: str, weights: str = "none", **options) -> nn.Module:
    """Build the image encoder `name` with `weights`; the module maps (B, 1, H, W) in [0, 1] to (B, out_features).

    `options` are the builder's keyword options (densenet121: memory_efficient; small_cnn: width,
    out_features). Unknown names or options raise UserError.
    """
    if name not in IMAGE_ENCODERS:
        raise UserError(f"unknown image encoder {name!r}: use one of {', '.join(sorted(IMAGE_ENCODERS))}")
    builder = IMAGE_ENCODERS[name]
    allowed = [p for p in inspect.signature(builder).parameters if p != "weights"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"image encoder {name}: unknown option(s) {', '.join(unknown)}; "
                        f"known: {', '.join(allowed) or 'none'}")
    return builder(weights=str(weights), **options)
