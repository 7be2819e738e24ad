"""Fine-tuning from another run's checkpoint (`init_from`) and AUCs restricted to known labels and to
`data.eval_classes`."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from vkd_pyro.config import config_from_dict
from vkd_pyro.errors import ConfigError, UserError
from vkd_pyro.training.build import build_module
from vkd_pyro.training.checkpoint import save_atomic
from vkd_pyro.training.evaluate import auc_metrics
from vkd_pyro.training.finetune import init_from_run, load_matching_weights

DIMS = {"hidden_size": 32, "num_heads": 2, "intermediate_size": 64}
SMALL = {"image_encoder": {"name": "small_cnn", "width": 4, "out_features": 16}, "model": {"z_dim": 8, "hidden": [8]}}


def _module(objective, **model):
    values = {**SMALL, "inference": {"objective": objective}}
    values["model"] = {**SMALL["model"], **model}
    config = config_from_dict(values)
    return build_module(config, DIMS if objective != "image_only" else None)


def _save_run(module, folder):
    folder.mkdir()
    save_atomic({"module": module.state_dict(), "epoch": 1}, folder / "checkpoint.pt")
    return folder


def test_model_weights_that_match_are_copied_and_the_guide_stays_behind(tmp_path):
    torch.manual_seed(0)
    source = _module("vkd")
    run = _save_run(source, tmp_path / "run")
    torch.manual_seed(1)
    target = _module("image_only")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    result = init_from_run(target, str(run))
    state, src = target.state_dict(), source.state_dict()
    assert set(result["loaded"]) == {k for k in state if k.startswith("model.")}
    assert result["missing_here"] == ["model.text_classifier.weight", "model.text_classifier.bias"]
    assert not any(k.startswith("guide.") for k in result["loaded"])
    for key in result["loaded"]:
        assert torch.equal(state[key], src[key])
    assert any(not torch.equal(before[k], state[k]) for k in result["loaded"] if state[k].is_floating_point())
    assert "loaded %d model tensors" % len(result["loaded"]) in result["message"]
    assert "skipped 2 (2 absent here, 0 of another shape)" in result["message"]
    assert load_matching_weights(target, str(run / "checkpoint.pt"))["loaded"] == result["loaded"]  # a file too


def test_tensors_of_another_shape_are_skipped_and_named(tmp_path):
    run = _save_run(_module("vkd"), tmp_path / "run")
    target = _module("vkd", z_dim=4)  # prior output and classifier input change shape
    before = {k: v.clone() for k, v in target.state_dict().items()}
    result = init_from_run(target, str(run))
    assert result["shape_mismatch"] and all("->" in m for m in result["shape_mismatch"])
    assert any(k.startswith("model.image_encoder.") for k in result["loaded"])
    for entry in result["shape_mismatch"]:
        name = entry.split(" ")[0]
        assert torch.equal(target.state_dict()[name], before[name])
    assert f"{len(result['shape_mismatch'])} of another shape" in result["message"]


def test_nothing_matching_or_no_checkpoint_is_a_user_error(tmp_path):
    source = _module("image_only")
    run = _save_run(source, tmp_path / "run")
    other = config_from_dict({"image_encoder": {"name": "small_cnn", "width": 6, "out_features": 10},
                              "model": {"z_dim": 3, "hidden": [5]}, "inference": {"objective": "image_only"}})
    with pytest.raises(UserError, match="none of the run's image encoder weights fits this config"):
        init_from_run(build_module(other), str(run))
    with pytest.raises(UserError, match="neither a run folder"):
        init_from_run(source, str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="checkpoint not found"):
        init_from_run(source, str(tmp_path / "empty"))


def test_auc_leaves_out_unknown_labels_and_unevaluated_classes():
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 3)) < 0.4).astype(np.float32)
    probs = rng.random((60, 3))
    mask = np.ones_like(labels)
    mask[:20, 0] = 0  # unknown labels of class a
    mask[:, 2] = 0  # class c never known
    labels[:20, 0] = 0.0
    m = auc_metrics(labels, probs, ["a", "b", "c"], mask)
    assert m["auc"]["a"] == pytest.approx(roc_auc_score(labels[20:, 0], probs[20:, 0]))
    assert m["auc"]["a"] != pytest.approx(roc_auc_score(labels[:, 0], probs[:, 0]))
    assert m["auc"]["c"] is None and m["positives"]["c"] == 0
    assert m["positives"]["a"] == int(labels[20:, 0].sum())
    pairs_y = np.concatenate([labels[20:, 0], labels[:, 1]])
    pairs_p = np.concatenate([probs[20:, 0], probs[:, 1]])
    assert m["micro_auc"] == pytest.approx(roc_auc_score(pairs_y, pairs_p))
    only_b = auc_metrics(labels, probs, ["a", "b", "c"], mask, evaluated=["b"])
    assert only_b["auc"]["a"] is None and only_b["macro_auc"] == pytest.approx(m["auc"]["b"])
    assert only_b["micro_auc"] == pytest.approx(m["auc"]["b"]) and only_b["positives"]["a"] == m["positives"]["a"]


def test_eval_classes_and_init_from_are_validated():
    config = config_from_dict({"data": {"eval_classes": ["Edema", "Pleural Effusion"]}, "init_from": "runs/x"})
    assert config.data.eval_classes == ["Edema", "Pleural Effusion"] and config.init_from == "runs/x"
    with pytest.raises(ConfigError, match="data.eval_classes: .* must be a non-empty list of the 14 class names"):
        config_from_dict({"data": {"eval_classes": ["Effusion"]}})
    with pytest.raises(ConfigError, match="data.label_policy: 'maybe' must be one of zeros, ones, ignore"):
        config_from_dict({"data": {"label_policy": "maybe"}})
