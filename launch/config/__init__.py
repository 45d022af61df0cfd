"""Configs: typed dataclass schemas (`schema`), loading YAML + `a.b=c` overrides into them (`loader`),
range and cross-key checks (`validation`) and the generated `--help` (`help`).

    from launch.config import load_config, validate
    cfg = load_config(["config=configs/tiny.yaml", "train.steps=10"]); validate(cfg)
"""

from launch.config.loader import (  # noqa: F401
    HELP_FLAGS,
    PRINT_FLAGS,
    check_keys,
    config_from_file,
    from_container,
    load_config,
    parse_overrides,
    plain,
    split_cli_flags,
    to_yaml,
)
from launch.config.schema import (  # noqa: F401
    Config,
    DataConfig,
    EvalConfig,
    GrowConfig,
    MemoryConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)
from launch.config.validation import (  # noqa: F401
    _range,
    check_ranges,
    validate,
    validate_eval,
)
