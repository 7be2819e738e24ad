"""Objectives as plugins (vkd_pyro.objectives): what each registered objective has, the README's own
objective (Eq. 8 with the KL reversed) pinned against a hand-written computation and run through
train, evaluate, diagnose, sweep, compare and load_run as it stands, and the trust rule for code
named by an import path (run folders and kd teachers)."""

import csv
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import vkd_pyro
from tests.test_objective import hand_terms, make_batch, make_module
from tests.tiny_runs import tiny_overrides
from vkd_pyro.cli import main
from vkd_pyro.config import config_from_dict
from vkd_pyro.errors import ConfigError
from vkd_pyro.inference.module import VKDModule
from vkd_pyro.objectives import OBJECTIVES, objective_for
from vkd_pyro.training.distillation import check_teacher
from vkd_pyro.training.loop import fit

REPO = Path(__file__).resolve().parents[1]

# What each objective has: (guide, teacher, reads reports, predicts from, test ELBO, distils, terms)
EXPECTED = {
    "vkd": (True, True, True, "images", True, False, ("loss", "image_nll", "text_nll", "kl")),
    "no_mi": (True, False, True, "images", True, False, ("loss", "image_nll", "kl")),
    "image_only": (False, False, False, "images", True, False, ("loss", "image_nll")),
    "text_only": (True, True, True, "reports", True, False, ("loss", "text_nll", "kl")),
    "kd": (False, False, True, "images", False, True, ("loss", "image_nll")),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_registered_objective_says_what_it_has(name):
    objective = objective_for(config_from_dict({}, "my.yaml", [f"inference.objective={name}"]))
    assert isinstance(objective, OBJECTIVES[name]) and objective.name == name
    has = (objective.has_guide, objective.has_teacher, objective.reads_reports, objective.predicts_from,
           objective.test_elbo, objective.distils, tuple(t.name for t in objective.terms))
    assert has == EXPECTED[name]
    assert objective.kl() is None and not objective.explicit_kl  # Pyro's own KL(q || p) unless a remedy is on


def test_the_remedies_make_the_kl_explicit_only_for_objectives_with_a_guide():
    for name, explicit in [("vkd", True), ("no_mi", True), ("text_only", True)]:
        config = config_from_dict({}, "my.yaml", [f"inference.objective={name}", "inference.free_bits=0.1"])
        assert objective_for(config).explicit_kl is explicit
    config = config_from_dict({}, "my.yaml", ["inference.kl_gradient=prior"])
    assert objective_for(config).explicit_kl and objective_for(config).find_unused_parameters


def test_no_objective_name_is_compared_outside_the_objective_classes():
    """`grep` for a comparison of inference.objective with a string finds none in the package."""
    pattern = re.compile(r"objective\s*(==|!=|\bin\b)\s*[\"'(\[{]|[\"']\s*(==|!=)\s*\S*objective\b")
    found = []
    for folder in ("vkd_pyro", "models", "guides"):
        for path in (REPO / folder).rglob("*.py"):
            if "objectives" in path.parts:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_term_names_are_defined_once():
    """The names of Eq. 8's terms appear as string literals in vkd_pyro/inference/terms.py only."""
    literal = re.compile(r"[\"'](image_nll|text_nll)[\"']")
    found = [f"{p.relative_to(REPO)}" for folder in ("vkd_pyro", "models", "guides")
             for p in (REPO / folder).rglob("*.py") if literal.search(p.read_text()) and p.name != "terms.py"]
    assert not found, found


# --------------------------------------------------------------------------- the README's objective


def readme_objective() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own objective"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """A user's folder holding the README's my_objectives.py as it stands (importable from there)."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "my_objectives.py").write_text(readme_objective())
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("my_objectives", None)


def reversed_module(module, config):
    objective = objective_for(config)
    return VKDModule(module.model, module.guide, elbo="trace", num_particles=module.elbo.num_particles,
                     terms=objective.terms, kl=objective.kl())


@pytest.mark.parametrize("L", [1, 4000])
def test_the_readme_objective_is_eq8_with_the_kl_reversed(user_folder, L):
    """loss = -(E_p log p(y|x_I,z_I) + E_q log q(y|z_T) - beta KL(p || q)), against the hand-written
    terms of tests/test_objective.py; the reversed KL recorded exactly (analytic), KL(q || p) beside it."""
    config = config_from_dict({}, "my.yaml", ["inference.objective=my_objectives:ReversedKL"])
    module = reversed_module(make_module(L=L, M=4000 if L > 1 else 1), config)
    with torch.no_grad():  # make the two directions far apart
        module.model.prior_net.net.head.bias[3:] = -1.0
        module.guide.posterior_net.net.head.bias[3:] = 1.0
    batch, beta = make_batch(), 0.3
    hand = hand_terms(module, batch)
    assert hand["kl_pq"].mean() < 0.5 * hand["kl_qp"].mean()
    loss, terms = module(batch, beta)
    assert terms.kl_pq == pytest.approx(hand["kl_pq"].mean().item(), rel=1e-5)
    assert terms.kl == pytest.approx(hand["kl_qp"].mean().item(), rel=1e-5)
    # the likelihood terms are read from the same draws: what is left of the loss is beta KL(p || q), exactly
    assert terms.loss - terms.image_nll - terms.text_nll == pytest.approx(beta * terms.kl_pq, rel=1e-5)
    if L > 1:
        expected = -(hand["image_ll"] + hand["text_ll"] - beta * hand["kl_pq"]).mean().item()
        assert loss.item() == pytest.approx(expected, abs=0.03)
    loss.backward()
    assert module.guide.posterior_net.net.head.weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def user_runs(user_folder, tmp_path_factory):
    """A sweep of vkd and the README's objective (one seed each), run from the user's folder."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sweep")
    cache = tmp_path_factory.getbasetemp() / "objectives-cache"
    code = main(["sweep", "--config", str(REPO / "configs" / "demo.yaml"), "--grid",
                 "inference.objective=vkd,my_objectives:ReversedKL", "--seeds", "1", "--out", str(out),
                 *tiny_overrides({"train.max_epochs": 2}), f"cache_dir={cache}"])
    assert code == 0
    runs = {p.name.split("-seed")[0].split("=", 1)[1]: p for p in (out / "runs").iterdir()}
    return out, runs


def test_the_readme_objective_trains_and_its_history_has_its_term(user_runs):
    _, runs = user_runs
    folder = runs["my_objectives_ReversedKL"]
    with open(folder / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "beta", "loss", "image_nll", "text_nll", "kl", "kl_pq", "val_macro_auc",
                             "seconds"]
    assert len(rows) == 2 and all(float(r["kl_pq"]) > 0 for r in rows)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["objective"] == "my_objectives:ReversedKL" and metrics["evaluated_on"] == "images"
    assert "teacher" in metrics  # a VKD subclass keeps the teacher q(y|z_T)


def test_the_sweep_tabulates_the_new_term(user_runs):
    out, _ = user_runs
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and "kl_pq" in rows[0]
    by_objective = {r["inference.objective"]: r for r in rows}
    assert float(by_objective["my_objectives:ReversedKL"]["kl_pq"]) > 0
    assert by_objective["vkd"]["kl_pq"] == "nan"  # vkd does not record it
    assert "test KL(p||q)" in (out / "sweep.md").read_text()


def test_the_readme_objective_works_in_evaluate_diagnose_compare_and_load_run(user_runs, capsys):
    _, runs = user_runs
    folder = runs["my_objectives_ReversedKL"]
    code = main(["evaluate", "--run", str(folder)])
    assert code == 2 and "inference.objective: 'my_objectives:ReversedKL' would import module" in \
        capsys.readouterr().err
    before = json.loads((folder / "metrics.json").read_text())
    assert main(["evaluate", "--run", str(folder), "--trust-code"]) == 0
    after = json.loads((folder / "metrics.json").read_text())
    for key in ("auc", "macro_auc", "micro_auc", "teacher"):
        assert after[key] == before[key], key  # the same seeded draws: the same figures
    assert main(["diagnose", "--run", str(folder), "--trust-code", "--samples", "8"]) == 0
    diagnostics = json.loads((folder / "diagnostics.json").read_text())
    assert set(diagnostics["elbo"]) >= {"loss", "image_nll", "text_nll", "kl", "kl_pq"}
    assert main(["figures", "--run", str(folder), "--trust-code", "--records", "0"]) == 0
    assert (folder / "figures" / "training_curves.png").is_file()  # a panel per recorded term, kl_pq too
    capsys.readouterr()
    assert main(["compare", str(runs["vkd"]), str(folder), "--boot", "200"]) == 0
    assert "macro" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--trust-code"):
        vkd_pyro.load_run(folder)
    run = vkd_pyro.load_run(folder, trust_code=True)
    assert type(run.objective).__name__ == "ReversedKL" and run.module.kl is not None
    metrics = run.evaluate("test")
    assert metrics["macro_auc"] == before["macro_auc"] and metrics["teacher"] == before["teacher"]


# --------------------------------------------------------------------------- kd teachers and trust

MARKER_MODULE = '''
from pathlib import Path
Path({marker!r}).write_text("imported")
from vkd_pyro.objectives import TextOnly


class MyTextOnly(TextOnly):
    """text_only under another name."""
'''


def test_a_kd_teacher_that_names_code_is_refused_without_trust_code(tmp_path, monkeypatch):
    """The teacher's config.yaml names its objective (or a family) by an import path: the student is
    refused in one line before that module is imported, unless trust_code (`train --trust-code`)."""
    marker = tmp_path / "imported.txt"
    (tmp_path / "my_teachers.py").write_text(MARKER_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    base = tiny_overrides() + [f"cache_dir={tmp_path / 'cache'}"]
    for key, value in [("inference.objective", "my_teachers:MyTextOnly"), ("model.guide", "my_teachers:Guide")]:
        config = config_from_dict({}, "teacher", base + ["inference.objective=text_only", f"{key}={value}"])
        (teacher / "config.yaml").write_text(json.dumps(config.to_dict()))
        (teacher / "checkpoint.pt").write_bytes(b"")
        student = config_from_dict({}, "student", base + ["inference.objective=kd", f"inference.kd.teacher={teacher}"])
        with pytest.raises(ConfigError, match=rf"^inference\.kd\.teacher: .*{re.escape(key)}: .*--trust-code"):
            check_teacher(student)
        with pytest.raises(ConfigError, match="--trust-code"):
            fit(student, tmp_path / "student", progress=False)
        assert not marker.exists() and "my_teachers" not in sys.modules
        assert not (tmp_path / "student").exists()  # refused before the run folder was made
    config = config_from_dict({}, "teacher", base + ["inference.objective=my_teachers:MyTextOnly"])
    (teacher / "config.yaml").write_text(json.dumps(config.to_dict()))
    folder, teacher_config = check_teacher(student, trust_code=True)  # trusted: imported, a text_only teacher
    assert marker.exists() and folder == teacher and teacher_config.inference.objective == "my_teachers:MyTextOnly"
