"""The run configuration: a typed schema with verl's key names (`schema`), loaded from YAML and `a.b.c=value`
overrides and validated (`loader`). The floor above `ground`: the registry, training, serving and the CLI read it.
"""

from config.loader import (ALGORITHM_PRESETS, DEFAULT_CONFIG, all_keys, load_config, overrides_to_dict,
                           parse_override, read_yaml, validate)
from config.schema import ActorConfig, AlgorithmConfig, Config, DataConfig, KLControlConfig

__all__ = ["Config", "ActorConfig", "AlgorithmConfig", "DataConfig", "KLControlConfig", "load_config", "validate",
           "all_keys", "parse_override", "overrides_to_dict", "read_yaml", "DEFAULT_CONFIG", "ALGORITHM_PRESETS"]
