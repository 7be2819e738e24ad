"""Objective `kd` (Hinton et al. 2015): the distillation loss against a hand-written computation,
the teacher's soft targets, and a tiny teacher -> student run with its one-line config errors."""

import json

import pytest
import torch

from tests.conftest import FeaturesAsImages
from tests.test_objective import FEAT, C, log_bernoulli, make_batch
from tests.tiny_runs import tiny_overrides
from vkd_pyro.config import config_from_dict
from vkd_pyro.data.prepare import prepare_data
from vkd_pyro.errors import ConfigError
from vkd_pyro.guides import NoGuide
from vkd_pyro.inference.module import VKDModule
from vkd_pyro.models import DistilledModel, tempered
from vkd_pyro.training.distillation import load_teacher, soft_targets, teacher_folder
from vkd_pyro.training.evaluate import teacher_split
from vkd_pyro.training.loop import fit


def test_distillation_loss_is_hard_plus_tempered_soft_bce():
    alpha, T, M = 0.3, 2.5, 4000
    model = DistilledModel(FeaturesAsImages(FEAT), C, z_dim=3, hidden=[8, 8], dropout=0.0, prior_samples=M,
                           alpha=alpha, temperature=T)
    module, batch = VKDModule(model, NoGuide()), make_batch()
    teacher = torch.rand(20, C, generator=torch.Generator().manual_seed(4))
    module.set_soft_targets(tempered(teacher, T))
    batch.index = torch.tensor([3, 7, 0, 19])
    with torch.no_grad():
        mp, sp = model.prior_net.loc_scale(batch.images)
        z = mp + sp * torch.randn((200_000,) + mp.shape, generator=torch.Generator().manual_seed(6))
        logits = model.class_logits(z, batch.images)
        q = torch.sigmoid(torch.logit(teacher[batch.index]) / T)  # the teacher at temperature T, by hand
        hard = log_bernoulli(logits, batch.labels).mean(0)
        soft = (q * torch.nn.functional.logsigmoid(logits / T)
                + (1 - q) * torch.nn.functional.logsigmoid(-logits / T)).sum(-1).mean(0)
        expected = -((1 - alpha) * hard + alpha * T**2 * soft).mean().item()
    loss, terms = module(batch, 0.9)  # beta does not enter: no KL term
    assert loss.item() == pytest.approx(expected, abs=0.03)
    assert terms.image_nll == pytest.approx(expected, abs=0.03) and terms.kl == 0.0 and terms.text_nll == 0.0
    # alpha = 0 is image_only's loss: the soft labels do not matter
    model.alpha = 0.0
    torch.manual_seed(0)
    a = module(batch, 0.0)[0].item()
    module.set_soft_targets(torch.rand(20, C))
    torch.manual_seed(0)
    assert module(batch, 0.0)[0].item() == pytest.approx(a, abs=1e-6)


def test_tempered_probabilities():
    p = torch.tensor([0.01, 0.2, 0.5, 0.9])
    assert tempered(p, 1.0) == pytest.approx(p, abs=1e-6)
    hot = tempered(p, 4.0)
    assert hot[2] == pytest.approx(0.5) and (hot - 0.5).abs().le((p - 0.5).abs()).all()  # softer, same side


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    torch.set_num_threads(1)
    cache = tmp_path_factory.getbasetemp() / "objectives-cache"  # shared by the tiny runs of these tests
    base = tiny_overrides({"train.max_epochs": 1, "train.batch_size": 8}) + [f"cache_dir={cache}"]
    folder = tmp_path_factory.mktemp("teacher")
    fit(config_from_dict({}, "tiny", base + ["inference.objective=text_only"]), folder, progress=False)
    return folder, base


def test_soft_targets_are_the_teachers_tempered_train_probabilities(teacher_run):
    folder, base = teacher_run
    config = config_from_dict({}, "tiny", base + ["inference.objective=kd", f"inference.kd.teacher={folder}",
                                                  "inference.kd.temperature=3", "inference.test_samples=64"])
    data = prepare_data(config, with_reports=True)
    table = soft_targets(config, data, "cpu")
    train = data.splits["train"]
    again = soft_targets(config, data, "cpu")  # its own generator: the same targets again
    torch.testing.assert_close(table, again, rtol=0, atol=0, equal_nan=True)
    teacher = load_teacher(config, "cpu")
    probs, _, _ = teacher_split(teacher, train, 4096, device="cpu")
    rows = table[torch.as_tensor(train.indices)]
    assert rows == pytest.approx(tempered(torch.as_tensor(probs), 3.0), abs=0.05)
    others = [i for i in range(len(table)) if i not in set(train.indices.tolist())]
    assert torch.isnan(table[others]).all()


def test_kd_trains_a_student_from_a_text_only_teacher(teacher_run, tmp_path):
    folder, base = teacher_run
    out = tmp_path / "kd"
    metrics = fit(config_from_dict({}, "tiny", base + ["inference.objective=kd", f"inference.kd.teacher={folder}"]),
                  out, progress=False)
    assert metrics["objective"] == "kd" and metrics["evaluated_on"] == "images" and "teacher" not in metrics
    assert json.loads((out / "metrics.json").read_text())["macro_auc"] == metrics["macro_auc"]


def test_a_teacher_that_is_not_a_text_only_run_of_the_same_data_is_refused(teacher_run, tmp_path):
    folder, base = teacher_run
    cases = [(tmp_path / "nowhere", "is not a finished run folder"),
             (folder, r"read other data: data\.split_seed is 0 there, 1 here")]
    for teacher, message in cases:  # image-only keys (data.image_size) may differ: a text teacher never sees them
        overrides = base + ["inference.objective=kd", f"inference.kd.teacher={teacher}", "data.split_seed=1",
                            "data.image_size=48"]
        with pytest.raises(ConfigError, match=rf"^inference\.kd\.teacher: .*{message}"):
            fit(config_from_dict({}, "tiny", overrides), tmp_path / "student", progress=False)
    assert not (tmp_path / "student").exists()  # refused before the run folder was made
    (tmp_path / "vkd").mkdir()
    config_yaml = (folder / "config.yaml").read_text().replace("objective: text_only", "objective: vkd")
    (tmp_path / "vkd" / "config.yaml").write_text(config_yaml)
    (tmp_path / "vkd" / "checkpoint.pt").write_bytes((folder / "checkpoint.pt").read_bytes())
    with pytest.raises(ConfigError, match=r"^inference\.kd\.teacher: .* trained with objective vkd, not text_only"):
        fit(config_from_dict({}, "tiny", base + ["inference.objective=kd", f"inference.kd.teacher={tmp_path / 'vkd'}"]),
            tmp_path / "student2", progress=False)


def test_the_teacher_path_names_the_runs_own_seed_and_data_values():
    config = config_from_dict({"seed": 2, "data": {"train_fraction": 0.3}, "inference": {
        "objective": "kd", "kd": {"teacher": "t/runs/data.train_fraction={data.train_fraction}-seed{seed}"}}})
    assert str(teacher_folder(config)) == "t/runs/data.train_fraction=0.3-seed2"
    config.inference.kd.teacher = "t/{nothing}"
    with pytest.raises(ConfigError, match=r"inference.kd.teacher: 't/\{nothing\}' names an unknown value"):
        teacher_folder(config)
