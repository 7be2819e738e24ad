"""Text side: the packaged MiniLM encoder offline, its feature store, padding and the trainable head."""

import socket

import pytest
import torch

from vkd_pyro.data.text_store import TextFeatureStore
from vkd_pyro.encoders import text as text_mod
from vkd_pyro.encoders.text import (
    PACKAGED_TEXT_ENCODER,
    FrozenTextEncoder,
    pad_token_states,
    resolve_text_model,
)
from vkd_pyro.encoders.text_head import TextHead
from vkd_pyro.errors import UserError

REPORTS = [
    "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
    "Mild cardiomegaly. Small left pleural effusion with adjacent atelectasis.",
    "No acute cardiopulmonary abnormality.",
    "Right upper lobe opacity concerning for pneumonia. No pneumothorax. Degenerative changes of the spine.",
]


def _refuse(*args, **kwargs):
    raise AssertionError("network access attempted")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test here fails if anything tries to open a network connection."""
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)


@pytest.fixture(scope="module")
def encoder():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _refuse)
        mp.setattr(socket, "create_connection", _refuse)
        mp.setenv("HF_HUB_OFFLINE", "1")
        return FrozenTextEncoder(PACKAGED_TEXT_ENCODER)


@pytest.fixture
def counter(encoder):
    """The number of texts (rows) of each forward call of the frozen model."""
    rows = []

    def hook(module, args, kwargs, output):
        rows.append(kwargs["input_ids"].shape[0])

    handle = encoder.model.register_forward_hook(hook, with_kwargs=True)
    yield rows
    handle.remove()


def test_packaged_encoder_loads_offline(encoder):
    assert resolve_text_model(PACKAGED_TEXT_ENCODER) == encoder.path
    assert encoder.hidden_size == 384
    assert encoder.num_attention_heads == 12
    assert encoder.intermediate_size == 1536
    assert encoder.model.config.vocab_size == 30522
    assert encoder.model.config.num_hidden_layers == 6
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert encoder.identity == text_mod._model_identity(text_mod.Path(encoder.path))  # stable


def test_tokenisation_cls_sep_truncation(encoder):
    tok = encoder.tokenizer
    long_text = " ".join(["opacity"] * 400)
    short, long_ids = encoder.tokenize([REPORTS[2], long_text], max_tokens=16)
    for ids in (short, long_ids):
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert len(long_ids) == 16
    assert len(short) < 16
    assert tok.convert_ids_to_tokens(short)[1:4] == ["no", "acute", "card"]
    assert len(encoder.tokenize([long_text])[0]) == 256  # the paper's default maximum
    with pytest.raises(UserError, match="max_tokens"):
        encoder.tokenize(["x"], max_tokens=1000)


def test_encode_shapes_dtype_and_batching(encoder):
    ids = encoder.tokenize(REPORTS, max_tokens=24)
    batched = encoder.encode(REPORTS, max_tokens=24, batch_size=3)
    assert [s.shape for s in batched] == [(len(i), 384) for i in ids]
    assert all(s.dtype == torch.float16 and not s.is_inference() for s in batched)
    # One text at a time (no padding) gives the same states as padded, length-sorted batches.
    alone = [encoder.encode([t], max_tokens=24)[0] for t in REPORTS]
    for a, b in zip(alone, batched):
        assert torch.allclose(a.float(), b.float(), atol=2e-2)
    # Different texts give different states.
    assert not torch.allclose(batched[0][0].float(), batched[1][0].float(), atol=1e-2)


def test_encode_on_a_device_reports_progress(encoder):
    done = []
    states = encoder.encode(REPORTS, max_tokens=24, batch_size=3, device="cpu", progress=done.append)
    assert done == [3, 1] and encoder.device == torch.device("cpu")
    assert [tuple(s.shape) for s in states] == [(len(i), 384) for i in encoder.tokenize(REPORTS, 24)]


def test_store_reuses_states_without_running_the_model(encoder, counter, tmp_path):
    store = TextFeatureStore.for_encoder(tmp_path, encoder, 32)
    first, report = store.get_or_compute(encoder, REPORTS[:3])
    assert sum(counter) == 3 and report.reports == 3 and report.device == "cpu"
    expected = encoder.encode(REPORTS[:3], max_tokens=32)
    assert sum(counter) == 6
    assert all(torch.equal(first[i], expected[i]) for i in range(3))
    assert first.lengths.tolist() == [s.shape[0] for s in expected]
    again, report = store.get_or_compute(encoder, REPORTS[:3])
    assert sum(counter) == 6 and report is None
    assert all(torch.equal(first[i], again[i]) for i in range(3))

    # A fresh store object reads the files from disk: still no model run.
    fresh, _ = TextFeatureStore.for_encoder(tmp_path, encoder, 32).get_or_compute(encoder, list(reversed(REPORTS[:3])))
    assert sum(counter) == 6
    assert all(torch.equal(first[i], fresh[2 - i]) for i in range(3))

    # Only the missing text is computed; duplicates are computed once.
    mixed, report = store.get_or_compute(encoder, [REPORTS[3], REPORTS[0], REPORTS[3]])
    assert sum(counter) == 7 and report.reports == 1
    assert torch.equal(mixed[1], first[0]) and torch.equal(mixed[0], mixed[2])

    # max_tokens is part of the key: another value means another store folder and a model run.
    TextFeatureStore.for_encoder(tmp_path, encoder, 8).get_or_compute(encoder, REPORTS[:1])
    assert sum(counter) == 8
    assert len(list((tmp_path / "text").iterdir())) == 2


def test_uncached_hub_id_and_missing_folder_raise(tmp_path):
    with pytest.raises(UserError) as err:
        resolve_text_model("vkd-pyro-tests/not-a-cached-model")
    message = str(err.value)
    assert "not available offline" in message
    assert "huggingface-cli download vkd-pyro-tests/not-a-cached-model" in message
    with pytest.raises(UserError, match="no-such-folder"):
        resolve_text_model(str(tmp_path / "no-such-folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        resolve_text_model(str(tmp_path / "empty"))


def test_pad_token_states():
    states = [torch.randn(3, 5).half(), torch.randn(6, 5).half()]
    padded, mask = pad_token_states(states)
    assert padded.shape == (2, 6, 5) and padded.dtype == torch.float16  # padded as stored; TextHead casts
    assert torch.equal(padded[1], states[1]) and torch.equal(padded[0, :3], states[0])
    assert mask.dtype == torch.bool and mask.tolist() == [[True] * 3 + [False] * 3, [True] * 6]
    assert torch.equal(padded[0, 3:], torch.zeros(3, 5, dtype=torch.float16))


def _head(pooling, seed=0):
    torch.manual_seed(seed)
    return TextHead(hidden_size=32, num_heads=4, intermediate_size=64, dropout=0.0, pooling=pooling)


def test_text_head_computes_float16_states_in_float32():
    """The store's float16 states, padded as they are, give what their float32 copy gives (the cast is exact)."""
    head = _head("cls").eval()
    states = torch.randn(2, 5, 32).half()
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2], dtype=torch.bool)
    out = head(states, mask)
    assert out.dtype == torch.float32 and torch.equal(out, head(states.float(), mask))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("train", [True, False])
def test_text_head_shape_and_mask(pooling, train):
    head = _head(pooling).train(train)
    states = torch.randn(3, 7, 32)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], dtype=torch.bool)
    out = head(states, mask)
    assert out.shape == (3, 32) and head.out_features == 32
    changed = states.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 32) * 10
    assert torch.allclose(head(changed, mask), out, atol=1e-5)
    # ...whereas changing a real token does change the output.
    changed[1, 1] += 1.0
    assert not torch.allclose(head(changed, mask)[1], out[1], atol=1e-4)


def test_text_head_cls_and_mean_differ_and_attention():
    cls_head, mean_head = _head("cls").eval(), _head("mean").eval()
    mean_head.load_state_dict(cls_head.state_dict())
    states = torch.randn(2, 5, 32)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2], dtype=torch.bool)
    pooled, attention = cls_head(states, mask, return_attention=True)
    assert torch.allclose(pooled, cls_head(states, mask))
    assert not torch.allclose(pooled, mean_head(states, mask), atol=1e-3)
    assert attention.shape == (2, 4, 5, 5)
    assert torch.allclose(attention.sum(-1), torch.ones(2, 4, 5), atol=1e-5)
    assert torch.all(attention[1, :, :, 3:] == 0)
    with pytest.raises(UserError, match="pooling"):
        TextHead(32, 4, 64, pooling="max")


def test_gradients_reach_the_head_only(encoder):
    head = TextHead.for_encoder(encoder, dropout=0.0, pooling="mean")
    padded, mask = pad_token_states(encoder.encode(REPORTS[:2], max_tokens=16))
    head(padded, mask).pow(2).sum().backward()
    grads = [p.grad for p in head.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None and not p.requires_grad for p in encoder.model.parameters())
