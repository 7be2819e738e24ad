"""Fine-tuning: start a run's model from the weights of a run trained on another dataset.

The paper's ChestX-ray14 column of Table 1 fine-tunes a model trained on MIMIC-CXR: ChestX-ray14
has no reports, so only the model side (image encoder, prior p(z_I|x_I), classifier p(y|x_I, z_I))
carries over; the guide's text side stays behind. `init_from=RUN_DIR` (a run folder, or the path of
its checkpoint.pt) copies every `model.*` tensor of the run's checkpoint whose name and shape match
this run's module, and says how many were loaded and how many skipped, and why.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vkd_pyro.errors import UserError
from vkd_pyro.training.checkpoint import load_checkpoint

PREFIX = "model."


def checkpoint_file(init_from: str) -> Path:
    """The checkpoint.pt of a run folder, or `init_from` itself when it is a file."""
    path = Path(init_from).expanduser()
    if path.is_dir():
        return path / "checkpoint.pt"
    if path.is_file():
        return path
    raise UserError(f"init_from: {path} is neither a run folder (with checkpoint.pt) nor a checkpoint file; "
                    f"pass the folder a `vkd-pyro train` run wrote")


def load_matching_weights(module: nn.Module, init_from: str) -> dict:
    """Copy the `model.*` tensors of a run's checkpoint into `module` where name and shape match.

    Returns {"checkpoint", "loaded", "loaded_values", "missing_here", "shape_mismatch",
    "not_in_checkpoint"}: names copied, how many numbers they hold, checkpoint tensors with no
    counterpart here, those whose shape differs, and this module's model.* tensors left at their
    initial values. `guide.*` tensors are never copied. A run whose image encoder weights all fail
    to match is a UserError: fine-tuning is about carrying the image encoder over.
    """
    file = checkpoint_file(init_from)
    state = load_checkpoint(file)
    source = state.get("module") if isinstance(state, dict) else None
    if not isinstance(source, dict):
        raise UserError(f"{file}: has no 'module' state dict (not a checkpoint written by vkd-pyro train)")
    target = module.state_dict()
    loaded, missing_here, mismatch = [], [], []
    update = {}
    for name, tensor in source.items():
        if not name.startswith(PREFIX):
            continue
        if name not in target:
            missing_here.append(name)
        elif tuple(target[name].shape) != tuple(tensor.shape):
            mismatch.append(f"{name} {tuple(tensor.shape)} -> {tuple(target[name].shape)}")
        else:
            update[name] = tensor
            loaded.append(name)
    encoder = [n for n in loaded if n.startswith(PREFIX + "image_encoder.") and not n.endswith("num_batches_tracked")]
    if not encoder:  # batch-norm step counters and the 14 class biases fit any model: they do not count
        raise UserError(f"init_from {file}: none of the run's image encoder weights fits this config in name and "
                        f"shape ({len(missing_here)} tensors absent here, {len(mismatch)} of another shape); use "
                        f"the image_encoder and model settings of the run to fine-tune from")
    with torch.no_grad():
        for name, tensor in update.items():
            target[name].copy_(tensor.to(dtype=target[name].dtype))
    # state_dict() tensors share storage with the parameters and buffers, so the copy is in place.
    not_in_checkpoint = [n for n in target if n.startswith(PREFIX) and n not in update]
    return {"checkpoint": str(file), "loaded": loaded,
            "loaded_values": int(sum(update[n].numel() for n in loaded)),
            "missing_here": missing_here, "shape_mismatch": mismatch, "not_in_checkpoint": not_in_checkpoint}


def describe(result: dict) -> str:
    """One line for the training log about what `load_matching_weights` did."""
    skipped = len(result["missing_here"]) + len(result["shape_mismatch"])
    line = (f"init_from {result['checkpoint']}: loaded {len(result['loaded'])} model tensors "
            f"({result['loaded_values']:,} values); skipped {skipped} "
            f"({len(result['missing_here'])} absent here, {len(result['shape_mismatch'])} of another shape)")
    if result["shape_mismatch"]:
        line += f", e.g. {result['shape_mismatch'][0]}"
    if result["not_in_checkpoint"]:
        line += f"; {len(result['not_in_checkpoint'])} model tensors here keep their initial values"
    return line


def init_from_run(module: nn.Module, init_from: str) -> dict:
    """`load_matching_weights` and a log line: returns the result with "message" added."""
    result = load_matching_weights(module, init_from)
    result["message"] = describe(result)
    return result
