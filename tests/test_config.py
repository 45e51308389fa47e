import math

import pytest

from loradrop import LoraDropConfig, select

BAD_FIELDS = [
    ("target_modules", []),
    ("target_modules", ""),
    ("target_modules", ["query", 3]),
    ("r", 0),
    ("r", 2.5),
    ("r", True),
    ("lora_alpha", 0),
    ("lora_alpha", math.nan),
    ("lora_dropout", 1.0),
    ("lora_dropout", -0.1),
    ("threshold", 0.0),
    ("threshold", 1.5),
    ("threshold", math.nan),
    ("sample_ratio", 0.0),
    ("sample_ratio", 1.01),
    ("probe_epochs", 0),
    ("probe_max_steps", 0),
    ("probe_batch_size", 0),
    ("probe_lr", -1e-3),
    ("strategy", "best"),
    ("seed", -1),
    ("reinit", "yes"),
    ("fast_path", "yes"),
    ("rank_dropout", 1.0),
    ("rank_dropout", -0.5),
    ("rank_dropout", math.nan),
    ("rank_dropout_granularity", "layer"),
    ("rank_dropout_rescale", 1),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_invalid_field_names_field_and_value(field, value):
    kwargs = {"target_modules": ["query"], field: value}
    with pytest.raises(ValueError) as err:
        LoraDropConfig(**kwargs)
    assert field in str(err.value)
    assert repr(value) in str(err.value)


def test_the_default_config_keeps_layers_until_ninety_percent():
    """The paper's rule with the default T: most important first until the cumulative share reaches 0.9."""
    plan = select({"query": {0: 0.05, 1: 0.5, 2: 0.3, 3: 0.15}}, LoraDropConfig())
    assert plan.retained == {"query": [1, 2, 3]} and plan.others == "shared"


def test_dict_round_trip_and_unknown_fields():
    cfg = LoraDropConfig(target_modules=["q_proj"], r=16, strategy="random", rank_dropout=0.3)
    assert LoraDropConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown LoraDropConfig fields \\['rank'\\]"):
        LoraDropConfig.from_dict({"target_modules": ["q"], "rank": 4})
