"""The teacher q(y|z_T) on the reports (metrics.json's `teacher` block) and objective `text_only`
(a variational information bottleneck, Alemi et al. 2017), against hand-written computations."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import MaskedMeanHead
from tests.test_objective import HID, B, C, Z, gaussian_kl, log_bernoulli, make_batch, make_module
from tests.tiny_runs import tiny_overrides
from vkd_pyro.classes import CLASSES
from vkd_pyro.config import config_from_dict
from vkd_pyro.guides import EHRPosterior
from vkd_pyro.inference.module import VKDModule
from vkd_pyro.models import ReportBottleneck
from vkd_pyro.training.evaluate import auc_metrics, teacher_metrics, teacher_split
from vkd_pyro.training.loop import fit
from vkd_pyro.training.predictions import read_predictions


def as_split(batch):
    """The batch's records as a dataset of items (what PairedSplit yields)."""
    return [{"idx": i, "img": batch.images[i], "lab": batch.labels[i],
             "token_states": batch.token_states[i][batch.token_mask[i]]} for i in range(batch.size)]


def test_teacher_split_is_the_monte_carlo_mean_over_posterior_draws():
    module, batch = make_module(), make_batch()
    module.eval()
    S = 20000
    probs, nll, labels = teacher_split(module, as_split(batch), S, batch_size=3)
    guide, model = module.guide, module.model
    with torch.no_grad():
        mq, sq = guide.posterior_net.loc_scale(guide.text_head(batch.token_states, batch.token_mask))
        g = torch.Generator().manual_seed(1)
        z = mq + sq * torch.randn((S,) + mq.shape, generator=g)
        logits = model.text_classifier(z)
        expected_probs = torch.sigmoid(logits).mean(0)
        expected_nll = F.binary_cross_entropy_with_logits(logits, batch.labels.expand(logits.shape),
                                                          reduction="none").mean(0)
    assert probs.shape == nll.shape == (B, C)
    np.testing.assert_allclose(probs, expected_probs.numpy(), atol=0.01)
    np.testing.assert_allclose(nll, expected_nll.numpy(), atol=0.03)
    np.testing.assert_array_equal(labels, batch.labels.numpy())
    # per draw, not of the averaged probability: the mean NLL is above -log of the mean likelihood
    assert nll.sum() > -np.log(np.where(labels > 0, probs, 1 - probs)).sum()


def test_teacher_metrics_leave_masked_labels_out():
    rng = np.random.default_rng(0)
    labels = (rng.random((40, C)) < 0.4).astype(np.float32)
    probs = rng.random((40, C)).astype(np.float32)
    nll = rng.random((40, C)).astype(np.float32)
    mask = np.ones_like(labels)
    mask[:, 2] = 0  # class 2 unknown everywhere
    mask[:10, 5] = 0
    config = config_from_dict({}, "t", [])
    block = teacher_metrics(probs, nll, labels, mask, config, samples=7)
    reference = auc_metrics(labels, probs, CLASSES, mask)
    assert block["evaluated_on"] == "reports" and block["S"] == 7
    assert block["auc"] == reference["auc"] and block["macro_auc"] == reference["macro_auc"]
    assert block["auc"][CLASSES[2]] is None
    assert block["nll"] == pytest.approx(float((nll * mask).sum(1).mean()), rel=1e-6)
    only = config_from_dict({}, "t", [f"data.eval_classes=[{CLASSES[0]}]"])
    assert teacher_metrics(probs, nll, labels, mask, only, 7)["nll"] == pytest.approx(float(nll[:, 0].mean()), rel=1e-6)


def test_text_only_loss_is_the_information_bottleneck():
    """-E_q[log q(y|z_T)] + beta KL(q(z_T|x_T) || N(0, I)), per record, with L draws."""
    posterior = EHRPosterior(MaskedMeanHead(HID), Z, [8, 8], 0.0)
    module, batch = VKDModule(ReportBottleneck(C, Z), posterior, num_particles=4000), make_batch()
    beta = 0.4
    with torch.no_grad():
        mq, sq = posterior.posterior_net.loc_scale(posterior.text_head(batch.token_states, batch.token_mask))
        z = mq + sq * torch.randn((200_000,) + mq.shape, generator=torch.Generator().manual_seed(2))
        text_ll = log_bernoulli(module.model.text_classifier(z), batch.labels).mean(0)
        kl = gaussian_kl(mq, sq, torch.zeros_like(mq), torch.ones_like(sq))
    loss, terms = module(batch, beta)
    assert loss.item() == pytest.approx((-text_ll + beta * kl).mean().item(), abs=0.03)
    assert terms.text_nll == pytest.approx(-text_ll.mean().item(), abs=0.03)
    assert terms.kl == pytest.approx(kl.mean().item(), rel=1e-5)
    assert terms.image_nll == 0.0
    assert module.teacher_logits(batch.token_states, batch.token_mask, 3).shape == (3, B, C)  # q(y|z_T) on reports
    with pytest.raises(ValueError, match="text_only"):
        module.predict(batch.images, 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny vkd run and a tiny text_only run (2 epochs each)."""
    torch.set_num_threads(1)
    cache = tmp_path_factory.getbasetemp() / "objectives-cache"  # shared by the tiny runs of these tests
    out = {}
    for objective in ("vkd", "text_only"):
        folder = tmp_path_factory.mktemp(objective)
        overrides = tiny_overrides({"train.max_epochs": 2, "train.batch_size": 8, "inference.objective": objective})
        fit(config_from_dict({}, "tiny", overrides + [f"cache_dir={cache}"]), folder, progress=False)
        out[objective] = folder
    return out


def test_a_run_with_a_guide_and_an_mi_head_reports_its_teacher(runs):
    metrics = json.loads((runs["vkd"] / "metrics.json").read_text())
    teacher = metrics["teacher"]
    assert metrics["evaluated_on"] == "images" and teacher["evaluated_on"] == "reports"
    assert set(teacher["auc"]) == set(CLASSES) and teacher["S"] == 2
    assert 0.0 <= teacher["macro_auc"] <= 1.0 and teacher["micro_auc"] is not None
    assert teacher["nll"] > 0
    assert teacher["macro_auc"] != metrics["macro_auc"]  # another input, another number


def test_text_only_is_evaluated_on_the_reports(runs):
    metrics = json.loads((runs["text_only"] / "metrics.json").read_text())
    assert metrics["objective"] == "text_only" and metrics["evaluated_on"] == "reports"
    for key in ("auc", "macro_auc", "micro_auc"):
        assert metrics[key] == metrics["teacher"][key]
    predictions = read_predictions(runs["text_only"])
    assert predictions.meta["evaluated_on"] == "reports"
    assert float(np.mean(predictions.probs)) > 0
    history = (runs["text_only"] / "history.csv").read_text().splitlines()
    assert len(history) == 3  # its own terms: no image NLL column
    assert history[0].split(",") == ["epoch", "beta", "loss", "text_nll", "kl", "val_macro_auc", "seconds"]
