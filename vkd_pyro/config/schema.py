"""The run configuration's schema: one typed dataclass a section, with defaults and per-key checks.

What each key means is written beside it. Reading, validating and writing config files is
`vkd_pyro.config.loading`; `vkd_pyro.config` offers both.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from vkd_pyro.classes import CLASSES
from vkd_pyro.errors import ConfigError


def _check(predicate, message):
    return {"check": (predicate, message)}


_POSITIVE = _check(lambda v: v > 0, "must be > 0")
_NON_NEGATIVE = _check(lambda v: v >= 0, "must be >= 0")
_PROBABILITY = _check(lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
_HALF_OPEN_PROBABILITY = _check(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")


def _one_of(*choices):
    return _check(lambda v: v in choices, "must be one of " + ", ".join(map(str, choices)))


@dataclass
class DataConfig:
    """Which dataset, where it lives, and how its records become (image, report, labels)."""

    name: str = field(default="openi_phantom", metadata=_one_of("openi_phantom", "openi", "mimic_cxr", "chestxray14"))
    # openi_phantom: the report archive (None = torchxrayvision's copy); openi: the folder of NLMCXR
    # PNGs; mimic_cxr: the MIMIC-CXR-JPG 2.0.0 folder; chestxray14: the ChestX-ray14 folder.
    root: Optional[str] = None
    # openi: the report archive or folder (None = torchxrayvision's copy); mimic_cxr: the folder
    # holding files/pXX/pSUBJECT/sSTUDY.txt (None = root).
    reports: Optional[str] = None
    image_size: int = field(default=64, metadata=_check(lambda v: v >= 16, "must be >= 16"))
    signal: float = field(default=1.0, metadata=_NON_NEGATIVE)  # how visible rendered findings are
    # openi_phantom: 0 = nominal films; up to 1 adds per-finding conspicuity spread, anatomical noise,
    # blur and quantum noise (vkd_pyro.data.phantom, docs/phantom_difficulty.md).
    difficulty: float = field(default=0.0, metadata=_PROBABILITY)
    include_indication: bool = False  # prepend the INDICATION section to FINDINGS + IMPRESSION
    split: list[float] = field(
        default_factory=lambda: [0.7, 0.1, 0.2],
        metadata=_check(lambda v: len(v) == 3 and min(v) > 0 and abs(sum(v) - 1) < 1e-6,
                        "must be three positive fractions (train, validation, test) summing to 1"),
    )
    split_seed: int = 0  # the split is by report and does not change with the training seed
    # Keep this fraction of the training split's groups (reports, patients), with their images,
    # reports and labels; a stable, nested subset chosen by split_seed (vkd_pyro.data.splits.reduce_train).
    # Validation and test are untouched.
    train_fraction: float = field(default=1.0, metadata=_check(lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"))
    # Noise in the training labels only (vkd_pyro.data.label_noise, docs/labels.md): rate r and kind,
    # symmetric (class-conditional flips that keep each class's prevalence) or missed (positives lost).
    label_noise: float = field(default=0.0, metadata=_HALF_OPEN_PROBABILITY)
    label_noise_kind: str = field(default="symmetric", metadata=_one_of("symmetric", "missed"))
    # What the training records' reports are replaced by (vkd_pyro.data.report_control): none, shuffled
    # (another training record's report) or labels (a text listing the record's training labels).
    report_control: str = field(default="none", metadata=_one_of("none", "shuffled", "labels"))
    max_reports: Optional[int] = field(default=None, metadata=_check(lambda v: v is None or v >= 10, "must be >= 10"))
    num_workers: int = field(default=0, metadata=_NON_NEGATIVE)
    # Real datasets (openi, mimic_cxr, chestxray14), see vkd_pyro/data/<name>.py:
    views: list[str] = field(default_factory=lambda: ["PA", "AP"],
                             metadata=_check(lambda v: len(v) > 0, "must name at least one view"))
    multi_image: str = field(default="first", metadata=_one_of("first", "all"))  # several frontal images of a report
    label_policy: str = field(default="zeros", metadata=_one_of("zeros", "ones", "ignore"))  # mimic_cxr: uncertain (-1)
    blank_policy: str = field(default="zeros", metadata=_one_of("zeros", "ignore"))  # mimic_cxr: blank (not mentioned)
    on_bad_record: str = field(default="error", metadata=_one_of("error", "skip"))  # skip: leave out and count
    val_fraction: float = field(default=0.1, metadata=_check(lambda v: 0.0 < v < 1.0, "must be in (0, 1)"))  # chestxray14
    # The classes the AUC table and metrics report (others are null); null = all 14.
    eval_classes: Optional[list[str]] = field(
        default=None, metadata=_check(lambda v: len(v) > 0 and set(v) <= set(CLASSES),
                                      "must be a non-empty list of the 14 class names: " + ", ".join(CLASSES)))


@dataclass
class ImageEncoderConfig:
    """The image backbone that maps a grayscale radiograph x_I to features."""

    name: str = field(default="small_cnn", metadata=_one_of("densenet121", "small_cnn"))
    weights: str = "none"  # none | imagenet | xrv | path to a state dict
    out_features: int = field(default=256, metadata=_POSITIVE)  # small_cnn only
    width: int = field(default=16, metadata=_POSITIVE)  # small_cnn only: channels of the first block
    # Channels-last (NHWC) convolution weights and activations: faster convolutions on GPUs with
    # tensor cores (small_cnn is always channels-last; this is for densenet121).
    channels_last: bool = False


@dataclass
class TextEncoderConfig:
    """The frozen BERT-family report encoder and the one trainable Transformer block on top."""

    name: str = "all-MiniLM-L6-v2"  # packaged stand-in for ClinicalBERT; a hub id or a local folder
    max_tokens: int = field(default=256, metadata=_check(lambda v: v >= 2, "must be >= 2"))
    pooling: str = field(default="cls", metadata=_one_of("cls", "mean"))
    dropout: float = field(default=0.1, metadata=_HALF_OPEN_PROBABILITY)
    # The trainable block's width, heads and feed-forward width; null = those of the encoder's own
    # layers (the paper). A narrower block (a linear projection first) makes CPU runs fast.
    block_width: Optional[int] = field(default=None, metadata=_check(lambda v: v > 0, "must be > 0"))
    block_heads: Optional[int] = field(default=None, metadata=_check(lambda v: v > 0, "must be > 0"))
    block_ffn: Optional[int] = field(default=None, metadata=_check(lambda v: v > 0, "must be > 0"))


@dataclass
class ModelConfig:
    """Sizes of the latent code and of the MLPs of the prior p(z_I|x_I) and posterior q(z_T|x_T),
    and their families: a registered name or an import path package.module:Name (checked when the
    module is built, `vkd_pyro.training.families`)."""

    z_dim: int = field(default=512, metadata=_POSITIVE)
    hidden: list[int] = field(default_factory=lambda: [512, 512],
                              metadata=_check(lambda v: all(h > 0 for h in v), "must be positive sizes"))
    dropout: float = field(default=0.5, metadata=_HALF_OPEN_PROBABILITY)
    prior: str = "diagonal"  # diagonal | lowrank | mixture | flow | standard | package.module:Name
    guide: str = "diagonal"  # diagonal | lowrank | flow | package.module:Name
    prior_options: dict = field(default_factory=dict)  # keyword options, e.g. {rank: 8}, {components: 4}
    guide_options: dict = field(default_factory=dict)  # e.g. {transform: affine_autoregressive, layers: 2}


@dataclass
class AnnealingConfig:
    """The KL weight beta_t (`vkd_pyro.inference.schedules`): Eq. 9's cyclical schedule, a monotonic warm-up,
    a constant, or none (beta = 1)."""

    schedule: str = field(default="cyclical", metadata=_one_of("cyclical", "monotonic", "constant", "none"))
    R: float = field(default=0.5, metadata=_check(lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"))
    C: int = field(default=4, metadata=_POSITIVE)  # cycles per epoch
    beta: float = field(default=1.0, metadata=_NON_NEGATIVE)  # the constant schedule's value
    g: str = field(default="linear", metadata=_one_of("linear", "sigmoid"))  # the ramp of cyclical and monotonic
    warmup_epochs: float = field(default=5.0, metadata=_POSITIVE)  # monotonic: epochs for beta to reach 1
    # The cap of the cyclical, monotonic and none schedules, by scaling: beta = beta_max * g(...), so
    # that Eq. 9 keeps its shape (`none`: beta = beta_max). The constant schedule is `beta` itself.
    beta_max: float = field(default=1.0, metadata=_NON_NEGATIVE)


@dataclass
class KDConfig:
    """Objective `kd` (Hinton et al. 2015): the teacher and the distillation loss
    (1 - alpha) BCE(y, p_student) + alpha T^2 BCE(p_teacher^T, p_student^T), T the temperature on the logits."""

    teacher: Optional[str] = None  # a finished `text_only` run folder (its checkpoint.pt and config.yaml)
    alpha: float = field(default=0.5, metadata=_PROBABILITY)
    temperature: float = field(default=2.0, metadata=_POSITIVE)


@dataclass
class InferenceConfig:
    """The objective of Eq. 8 and its ablations, the ELBO estimator and the Monte Carlo counts.

    Objectives (`vkd_pyro.objectives`, resolved when a run is built): `vkd` (Eq. 8), `no_mi`
    (without L_MI), `image_only` (the image classifier alone), `text_only` (the report branch alone, a
    variational information bottleneck; Alemi et al. 2017), `kd` (knowledge distillation from a
    `text_only` teacher; Hinton et al. 2015), or a user's class by its import path package.module:Name.
    """

    objective: str = field(default="vkd", metadata=_check(lambda v: bool(v.strip()), "must name an objective"))
    # trace: Trace_ELBO (Monte Carlo KL); meanfield: TraceMeanField_ELBO (analytic KL); stl: Trace_ELBO's
    # value with the path-derivative gradient (Roeder et al. 2017, vkd_pyro.inference.stl; no flow guide).
    elbo: str = field(default="trace", metadata=_one_of("trace", "meanfield", "stl"))
    num_particles: int = field(default=1, metadata=_POSITIVE)  # L: guide samples z_T
    prior_samples: int = field(default=1, metadata=_POSITIVE)  # M: prior samples z_I in the training term
    test_samples: int = field(default=16, metadata=_POSITIVE)  # S: prior samples at test time
    annealing: AnnealingConfig = field(default_factory=AnnealingConfig)
    # Remedies for posterior collapse (vkd_pyro.inference.module.VKDModule):
    # free bits (Kingma et al. 2016): the KL counts as sum_d max(free_bits, KL_d), KL_d per latent
    # dimension averaged over the batch; 0 = off (the paper's ELBO). Diagonal Normal prior and guide.
    free_bits: float = field(default=0.0, metadata=_NON_NEGATIVE)
    # The first epochs train with beta = 0 (guide, MI head and the image side alike), then the schedule starts.
    guide_warmup_epochs: int = field(default=0, metadata=_NON_NEGATIVE)
    # both: the paper's ELBO; prior: a variant in which the KL term moves only the prior (q detached in it).
    kl_gradient: str = field(default="both", metadata=_one_of("both", "prior"))
    kd: KDConfig = field(default_factory=KDConfig)


@dataclass
class TrainConfig:
    """SVI with Adam on mini-batches, early stopping on validation macro AUC."""

    batch_size: int = field(default=64, metadata=_POSITIVE)
    eval_batch_size: int = field(default=256, metadata=_POSITIVE)
    lr: float = field(default=1e-3, metadata=_POSITIVE)
    weight_decay: float = field(default=0.0, metadata=_NON_NEGATIVE)
    max_epochs: int = field(default=30, metadata=_POSITIVE)
    patience: int = field(default=3, metadata=_POSITIVE)  # epochs without a >tolerance improvement
    tolerance: float = field(default=0.01, metadata=_NON_NEGATIVE)  # the paper's 1%, relative
    progress: bool = True  # a tqdm bar with the ELBO terms
    tensorboard: bool = False  # the ELBO terms of every step to TensorBoard, in <run>/tensorboard/
    # Mixed precision for the image backbone and the text block: bf16 autocast (no loss scaling
    # needed); the probabilistic part (Gaussians, log-likelihoods, KL) stays float32.
    amp: str = field(default="none", metadata=_one_of("none", "bf16"))
    grad_clip: Optional[float] = field(default=None, metadata=_check(lambda v: v > 0, "must be > 0 (or null: no clipping)"))
    # On a GPU the loss terms stay on the device and are read back (progress bar, NaN check,
    # SIGINT/SIGTERM agreement between processes) every log_every steps; on the CPU every step.
    log_every: int = field(default=50, metadata=_POSITIVE)
    # Also write the resume state last.pt every this many steps (null: at the end of each epoch only).
    checkpoint_every: Optional[int] = field(default=None, metadata=_POSITIVE)
    # Several GPUs: synchronise batch-norm statistics across processes (CUDA only).
    sync_batchnorm: bool = False
    # Debug and tests: behave as if SIGTERM arrived after this many optimizer steps (in total).
    stop_after_steps: Optional[int] = field(default=None, metadata=_POSITIVE)


@dataclass
class Config:
    """A whole run."""

    seed: int = 0
    device: str = field(default="cpu", metadata=_one_of("auto", "cpu", "cuda"))
    cache_dir: Optional[str] = None  # None = $VKD_PYRO_CACHE or ~/.cache/vkd-pyro
    # Fine-tuning: a run folder (or its checkpoint.pt) whose model.* weights that match in name and
    # shape initialise this run's model (vkd_pyro.training.finetune), e.g. MIMIC-CXR -> ChestX-ray14.
    init_from: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def resolved_cache_dir(self) -> Path:
        """Where rendered images and frozen text features are cached."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return cache_dir_from_env()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: The default cache folder when neither `cache_dir` nor $VKD_PYRO_CACHE names one.
DEFAULT_CACHE_DIR = "~/.cache/vkd-pyro"

def cache_dir_from_env() -> Path:
    """$VKD_PYRO_CACHE (expanded), or ~/.cache/vkd-pyro when it is unset; ConfigError when it is
    set but blank (an empty value would otherwise mean the current folder)."""
    value = os.environ.get("VKD_PYRO_CACHE")
    if value is None:
        return Path(DEFAULT_CACHE_DIR).expanduser()
    if not value.strip():
        raise ConfigError("VKD_PYRO_CACHE: the environment variable is set but empty; unset it "
                          f"(the cache is then {DEFAULT_CACHE_DIR}) or set it to a folder")
    return Path(value).expanduser()
