import math

import pytest

from loradrop import LoraDropConfig, RankDropoutConfig

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


def test_defaults_follow_the_paper():
    cfg = LoraDropConfig(target_modules=["query", "value"])
    assert (cfg.r, cfg.threshold, cfg.sample_ratio, cfg.probe_epochs, cfg.strategy) == (8, 0.9, 0.1, 3.0, "importance")
    assert cfg.reinit and cfg.rank_dropout == 0.0


def test_dict_round_trip_and_unknown_fields():
    cfg = LoraDropConfig(target_modules=["q_proj"], r=16, strategy="random", rank_dropout=0.3)
    assert LoraDropConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown LoraDropConfig fields \\['rank'\\]"):
        LoraDropConfig.from_dict({"target_modules": ["q"], "rank": 4})


def test_rank_dropout_config_default_is_the_authors_code():
    rd = RankDropoutConfig()
    assert (rd.p, rd.granularity, rd.rescale) == (0.5, "token", True)
    assert LoraDropConfig(target_modules=["q"], rank_dropout=0.2).rank_dropout_config.p == 0.2
