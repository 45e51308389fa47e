import pytest

from loradrop import LoraDropConfig, Plan, select
from loradrop.selection import count_by_threshold


def cfg(**kw):
    return LoraDropConfig(target_modules=["q"], **kw)


IMP = {"q": {0: 0.05, 1: 0.4, 2: 0.1, 3: 0.3, 4: 0.15}}  # ranked: 1, 3, 4, 2, 0


def test_importance_keeps_most_important_until_threshold():
    # 0.4 + 0.3 = 0.7 < 0.8; + 0.15 = 0.85 >= 0.8
    plan = select(IMP, cfg(threshold=0.8))
    assert plan.retained == {"q": [1, 3, 4]}
    assert plan.others_of("q") == [0, 2]
    assert plan.others == "shared"


def test_threshold_reached_exactly_despite_rounding():
    imp = {"q": {0: 0.7, 1: 0.2, 2: 0.1}}  # 0.7 + 0.2 = 0.8999999999999999 in floats
    assert select(imp, cfg(threshold=0.9)).retained == {"q": [0, 1]}


@pytest.mark.parametrize(
    "strategy,expected",
    [("importance", [1, 3, 4]), ("inverse", [0, 2, 4]), ("top_k", [2, 3, 4]), ("no_share", [1, 3, 4]),
     ("inverse_share", [0, 2])],  # the 3 most important (1, 3, 4) share; the other 2 keep their own
)
def test_ablations_keep_k_layers(strategy, expected):
    plan = select(IMP, cfg(threshold=0.8, strategy=strategy))
    assert plan.retained == {"q": expected}
    assert plan.others == ("dropped" if strategy == "no_share" else "shared")


def test_inverse_share_keeps_the_least_important_layer_when_every_layer_is_important():
    assert select({"q": {0: 0.5, 1: 0.4, 2: 0.1}}, cfg(threshold=1.0, strategy="inverse_share")).retained == {"q": [2]}


def test_random_is_seeded_and_keeps_k():
    a = select(IMP, cfg(threshold=0.8, strategy="random", seed=3)).retained["q"]
    b = select(IMP, cfg(threshold=0.8, strategy="random", seed=3)).retained["q"]
    assert a == b and len(a) == 3 and set(a) <= set(range(5))
    draws = {tuple(select(IMP, cfg(threshold=0.8, strategy="random", seed=s)).retained["q"]) for s in range(20)}
    assert len(draws) > 1  # the seed matters


def test_threshold_one_keeps_every_layer_even_with_zero_importance():
    imp = {"q": {0: 0.0, 1: 1.0, 2: 0.0}}
    assert select(imp, cfg(threshold=1.0)).retained == {"q": [0, 1, 2]}


def test_dominant_layer_alone():
    imp = {"q": {0: 0.01, 1: 0.95, 2: 0.04}}
    assert select(imp, cfg(threshold=0.9)).retained == {"q": [1]}


def test_single_layer_and_at_least_one():
    assert select({"q": {5: 1.0}}, cfg(threshold=0.1)).retained == {"q": [5]}
    assert count_by_threshold({0: 0.5, 1: 0.5}, 1e-6) == 1


def test_ties_prefer_lower_layer():
    imp = {"q": {0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25}}
    assert select(imp, cfg(threshold=0.5)).retained == {"q": [0, 1]}
    assert select(imp, cfg(threshold=0.5, strategy="inverse")).retained == {"q": [0, 1]}


def test_types_are_selected_independently():
    imp = {"q": {0: 0.9, 1: 0.1}, "v": {0: 0.1, 1: 0.9}}
    assert select(imp, cfg(threshold=0.9)).retained == {"q": [0], "v": [1]}


def test_plan_json_round_trip():
    plan = select({"q": IMP["q"], "v": {0: 0.5, 1: 0.5}}, cfg(threshold=0.8))
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.importance["q"] == [0.05, 0.4, 0.1, 0.3, 0.15]


def test_plan_validation():
    with pytest.raises(ValueError, match="non-empty subset"):
        Plan(layers={"q": [0, 1]}, retained={"q": [2]})
    with pytest.raises(ValueError, match="'kept'"):
        Plan(layers={"q": [0]}, retained={"q": [0]}, others="kept")
    with pytest.raises(ValueError, match="not a loradrop plan"):
        Plan.from_json('{"layers": {}}')
    with pytest.raises(ValueError, match="importance is empty"):
        select({}, cfg())
