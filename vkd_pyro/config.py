"""The run configuration: typed defaults, YAML loading, dotted overrides and validation.

A config file is UTF-8 YAML holding one mapping with the sections below; any key left out keeps
its default, and an empty file (or one holding only comments or `null`) is all defaults. Every
mistake raises :class:`ConfigError` with one line that names the file and the dotted key, which the
CLI prints before exiting with status 2: an unknown key, a wrong type, a value out of range, a file
that is missing, a folder, unreadable, not UTF-8 text or not valid YAML, a top level that is not a
mapping, a key written twice in one mapping, YAML aliases that would expand to more than
`MAX_YAML_NODES` values (checked before anything is expanded), an integer beyond 64 bits, a
non-finite number (.nan, .inf) anywhere a number is read, and a seed (`seed`, any `*_seed`) outside
0..2**32-1. An empty `VKD_PYRO_CACHE` environment variable is refused too (see `cache_dir_from_env`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from vkd_pyro.classes import CLASSES
from vkd_pyro.errors import ConfigError
from vkd_pyro.files import write_text


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
    elbo: str = field(default="trace", metadata=_one_of("trace", "meanfield"))
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
#: Integers must fit in a signed 64-bit integer (what torch and numpy hold them in).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Seeds (`seed` and every `*_seed` key) are what numpy's and torch's generators accept.
SEED_MAX = 2**32 - 1
#: A config file may hold at most this many YAML values once its aliases are expanded.
MAX_YAML_NODES = 10_000
#: ... and at most this many aliases (`*name`).
MAX_YAML_ALIASES = 100


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


def _is_seed(dotted: str) -> bool:
    name = dotted.rsplit(".", 1)[-1]
    return name == "seed" or name.endswith("_seed")


def _check_finite(value: Any, where: str) -> None:
    """ConfigError naming `where` for a float that is NaN or infinite or an int beyond 64 bits,
    looking inside lists and mappings (option dicts) too."""
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        digits = str(abs(value))
        shown = value if len(digits) <= 30 else f"{'-' if value < 0 else ''}{digits[:6]}...({len(digits)} digits)"
        raise ConfigError(f"{where}: {shown} does not fit in a 64-bit integer")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")


def _type_name(tp) -> str:
    if _is_optional(tp):
        return _type_name(_optional_arg(tp)) + " or null"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    return getattr(tp, "__name__", str(tp))


def _is_optional(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _optional_arg(tp):
    return next(a for a in typing.get_args(tp) if a is not type(None))


def _coerce(value: Any, tp, where: str):
    """`value` as type `tp`, or ConfigError naming `where`. Ints pass as floats; numeric strings as
    floats. Numbers must be finite and integers fit in 64 bits, wherever they are (`_check_finite`)."""
    _check_finite(value, where)
    if _is_optional(tp):
        return None if value is None else _coerce(value, _optional_arg(tp), where)
    if typing.get_origin(tp) is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                _check_finite(number, where)
                return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _build(cls, values: dict, where: str):
    """An instance of dataclass `cls` from a (partial) mapping, validating every key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"{dotted}: unknown key (known: {', '.join(fields)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, dotted)
            continue
        value = _coerce(value, tp, dotted)
        if _is_seed(dotted) and isinstance(value, int) and not 0 <= value <= SEED_MAX:
            raise ConfigError(f"{dotted}: {value} must be in 0..{SEED_MAX} (a seed)")
        check = fields[key].metadata.get("check")
        if check is not None and value is not None and not check[0](value):
            raise ConfigError(f"{dotted}: {value!r} {check[1]}")
        kwargs[key] = value
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def split_assignment(text: str) -> Optional[tuple[str, str]]:
    """`key=rest` -> ("key", "rest") (the key stripped); None when there is no `=` or no key."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    return (key, raw) if sep and key else None


def parse_value(raw: str, source: str = "value") -> Any:
    """A value as YAML reads it (1 -> int, 0.5 -> float, true -> bool, [1, 2] -> list); the text
    itself when it is not YAML; "" for blank text. Read with the same limits as a config file
    (no duplicate keys, bounded aliases): such a value is refused with a ConfigError."""
    if not raw.strip():
        return ""
    try:
        return _safe_yaml(raw, source)
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply") from None
    except yaml.YAMLError:
        return raw


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` -> ("key.sub", value parsed as YAML)."""
    assignment = split_assignment(text)
    if assignment is None:
        raise ConfigError(f"{text}: overrides are written key.sub=value")
    key, raw = assignment
    return key, parse_value(raw, key)


def config_from_dict(values: dict, source: str = "config", overrides: typing.Sequence[str] = ()) -> Config:
    """A validated Config from a mapping (as read from YAML) and dotted overrides."""
    tree = dict(values or {})
    tree = yaml.safe_load(yaml.safe_dump(tree))  # a deep copy
    try:
        for text in overrides:
            key, value = parse_override(text)
            _set_dotted(tree, key, value)
        return _build(Config, tree, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _node_line(node) -> int:
    return node.start_mark.line + 1


def _check_nodes(root, source: str) -> None:
    """Walk a composed YAML node graph (aliases not expanded) and refuse, with a ConfigError naming
    `source` and the dotted key: a key written twice in one mapping, a recursive alias, more than
    MAX_YAML_ALIASES aliases, or more than MAX_YAML_NODES values once aliases were expanded."""
    sizes: dict[int, int] = {}  # id(node) -> its expanded size
    open_nodes: set[int] = set()
    aliases = 0

    def walk(node, dotted: str) -> int:
        nonlocal aliases
        name = dotted or "(top level)"
        if id(node) in sizes:  # a second reference to a node: an alias
            aliases += 1
            if aliases > MAX_YAML_ALIASES:
                raise ConfigError(f"{source}: {name}: more than {MAX_YAML_ALIASES} YAML aliases (line {_node_line(node)})")
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise ConfigError(f"{source}: {name}: a YAML alias refers to itself (line {_node_line(node)})")
        open_nodes.add(id(node))
        size = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                child = f"{dotted}.{key}" if dotted else str(key)
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    ident = (key_node.tag, key)
                    if ident in seen:
                        raise ConfigError(f"{source}: {child}: duplicate key (lines {seen[ident]} and "
                                          f"{_node_line(key_node)}); write each key once")
                    seen[ident] = _node_line(key_node)
                size += walk(key_node, child) + walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                size += walk(item, f"{name}[{i}]")
        if size > MAX_YAML_NODES:
            raise ConfigError(f"{source}: {name}: YAML aliases expand to more than {MAX_YAML_NODES} values "
                              f"(line {_node_line(node)}); a config needs far fewer")
        open_nodes.discard(id(node))
        sizes[id(node)] = size
        return size

    walk(root, "")


def _safe_yaml(text: str, source: str) -> Any:
    """`text` read as one YAML document with PyYAML's SafeLoader, after `_check_nodes` (None for an
    empty document). YAML syntax errors are raised as yaml.YAMLError."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_config_file(path: str | os.PathLike) -> dict:
    """The mapping in the YAML config file at `path` ({} for an empty file), or a one-line
    ConfigError naming the file (and the key, where there is one)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file (give the YAML file inside it)")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: config file cannot be read ({exc.strerror or type(exc).__name__})") from None
    if b"\0" in data:
        raise ConfigError(f"{path}: a binary file, not a YAML config (it holds NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}); "
                          "save the config as UTF-8") from None
    try:
        values = _safe_yaml(text, str(path))
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to be a config") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None)
        raise ConfigError(f"{path}: not valid YAML{where}" + (f" ({problem})" if problem else "")) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        kind = {list: "a list", str: "a string"}.get(type(values), f"a {type(values).__name__}")
        raise ConfigError(f"{path}: (top level): expected a mapping of sections (e.g. `train: {{lr: 0.001}}`), "
                          f"got {kind}")
    return values


def load_config(path: str | os.PathLike | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config file (`read_config_file`; the defaults when `path` is None), apply dotted
    overrides, and validate; a one-line ConfigError naming the file and key for any mistake. With
    `cache_dir` unset, $VKD_PYRO_CACHE is checked here too, so a blank one is refused up front."""
    if path is None:
        config = config_from_dict({}, "defaults", overrides)
    else:
        config = config_from_dict(read_config_file(path), str(path), overrides)
    if not config.cache_dir:
        cache_dir_from_env()
    return config


def save_config(config: Config, path: str | os.PathLike, comment: str = "") -> None:
    """Write the resolved config as YAML (what `train` puts in the run folder), after `comment`
    (lines starting with #: what produced the run, `vkd_pyro.training.provenance`)."""
    write_text(path, comment + yaml.safe_dump(config.to_dict(), sort_keys=False))
