"""The run configuration: the schema (`vkd_pyro.config.schema`: typed sections with defaults and
checks) and config files (`vkd_pyro.config.loading`: YAML, dotted overrides, one-line errors naming
the file and key). Pure Python: importing it imports no torch.
"""

from vkd_pyro.config.loading import (
    MAX_YAML_ALIASES,
    MAX_YAML_NODES,
    SEED_MAX,
    config_from_dict,
    load_config,
    parse_override,
    parse_value,
    read_config_file,
    save_config,
    split_assignment,
)
from vkd_pyro.config.schema import (
    DEFAULT_CACHE_DIR,
    AnnealingConfig,
    Config,
    DataConfig,
    ImageEncoderConfig,
    InferenceConfig,
    KDConfig,
    ModelConfig,
    TextEncoderConfig,
    TrainConfig,
    cache_dir_from_env,
)

__all__ = ["Config", "DataConfig", "ImageEncoderConfig", "TextEncoderConfig", "ModelConfig", "AnnealingConfig",
           "KDConfig", "InferenceConfig", "TrainConfig", "DEFAULT_CACHE_DIR", "cache_dir_from_env", "load_config",
           "config_from_dict", "read_config_file", "save_config", "parse_override", "parse_value",
           "split_assignment", "MAX_YAML_NODES", "MAX_YAML_ALIASES", "SEED_MAX"]
