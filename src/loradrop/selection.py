"""From importance to a plan: which layers of each module type keep their own LoRA.

``importance`` is the paper's rule (most important first until the cumulative importance reaches
T); ``inverse``, ``random`` and ``top_k`` are its Table 5 ablations, each keeping as many layers as
``importance`` would for that type; ``no_share`` keeps what ``importance`` keeps and gives the other
layers no LoRA at all instead of a shared one.

Table 5's "inverse" reads two ways: keep the k least important layers' own LoRA (``inverse``: the same
number of own LoRAs as LoRA-drop, the opposite layers), or let the k most important layers share
one LoRA and keep every other layer's own (``inverse_share``: the opposite roles).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from .config import STRATEGIES, LoraDropConfig

Importance = dict[str, dict[int, float]]  # module type -> layer -> I (each type sums to 1)

_SUM_TOL = 1e-6  # importance per type sums to 1 up to float rounding (and JSON's round trip)
_TOL = 1e-9  # cumulative sums of floats that should reach T may fall short by rounding


@dataclass
class Plan:
    """Per module type: every layer that has a site, the layers that keep their own LoRA, and what
    the others get (``shared``: one LoRA for all of them; ``dropped``: none)."""

    layers: dict[str, list[int]]
    retained: dict[str, list[int]]
    others: str = "shared"
    strategy: str = "importance"
    threshold: float = 0.9
    importance: dict[str, list[float]] | None = None  # aligned with ``layers``

    def __post_init__(self) -> None:
        if self.others not in ("shared", "dropped"):
            raise ValueError(f"Plan.others={self.others!r} is invalid: must be 'shared' or 'dropped'")
        if set(self.retained) != set(self.layers):
            raise ValueError(
                f"Plan.retained names module types {sorted(self.retained)} but Plan.layers names "
                f"{sorted(self.layers)}; both must list the same types"
            )
        for t, kept in self.retained.items():
            if not kept or not set(kept) <= set(self.layers[t]):
                raise ValueError(
                    f"Plan.retained[{t!r}]={kept} must be a non-empty subset of the layers {self.layers[t]}"
                )

    def others_of(self, module_type: str) -> list[int]:
        kept = set(self.retained[module_type])
        return [layer for layer in self.layers[module_type] if layer not in kept]

    def role(self, module_type: str, layer: int) -> str:
        """``retained``, ``shared`` or ``dropped``."""
        return "retained" if layer in self.retained[module_type] else self.others

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"not a loradrop plan: {err}") from None


def _ranked(scores: dict[int, float], descending: bool) -> list[int]:
    """Layers by importance; ties go to the lower layer index so results do not depend on order."""
    sign = -1.0 if descending else 1.0
    return sorted(scores, key=lambda layer: (sign * scores[layer], layer))


def count_by_threshold(scores: dict[int, float], threshold: float) -> int:
    """How many of the most important layers it takes for their importance to reach ``threshold``
    (at least one; all of them at T = 1, which is plain LoRA)."""
    if threshold >= 1.0:
        return len(scores)
    total = 0.0
    for k, layer in enumerate(_ranked(scores, descending=True), start=1):
        total += scores[layer]
        if total >= threshold - _TOL:
            return k
    return len(scores)


def _choose(module_type: str, scores: dict[int, float], strategy: str, threshold: float, seed: int) -> list[int]:
    k = count_by_threshold(scores, threshold)
    if strategy in ("importance", "no_share"):
        chosen = _ranked(scores, descending=True)[:k]
    elif strategy == "inverse":
        chosen = _ranked(scores, descending=False)[:k]
    elif strategy == "inverse_share":  # the other reading of Table 5's "inverse": the k most important share
        chosen = _ranked(scores, descending=False)[:max(1, len(scores) - k)]  # a plan keeps at least one layer
    elif strategy == "top_k":
        chosen = sorted(scores)[-k:]
    elif strategy == "random":
        rng = np.random.default_rng([seed, zlib.crc32(module_type.encode())])
        chosen = [int(x) for x in rng.choice(sorted(scores), size=k, replace=False)]
    else:
        raise ValueError(f"strategy={strategy!r} is invalid: must be one of {', '.join(STRATEGIES)}")
    return sorted(chosen)


def select(importance: Importance, cfg: LoraDropConfig) -> Plan:
    """The plan that ``cfg.strategy`` and ``cfg.threshold`` choose from per-type importance."""
    if not importance or any(not scores for scores in importance.values()):
        raise ValueError("importance is empty: it needs at least one module type with one layer")
    for t, scores in importance.items():
        values = [float(v) for v in scores.values()]
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"importance of {t!r} must be finite and non-negative, got {scores}")
    sums = {t: sum(float(v) for v in scores.values()) for t, scores in importance.items()}
    if any(abs(total - 1.0) > _SUM_TOL for total in sums.values()):
        raise ValueError(f"importance must sum to 1 within each module type (normalise g per type), but sums to "
                         f"{', '.join(f'{t}: {total:.6g}' for t, total in sums.items())}")
    layers = {t: sorted(scores) for t, scores in importance.items()}
    return Plan(
        layers=layers,
        retained={t: _choose(t, s, cfg.strategy, cfg.threshold, cfg.seed) for t, s in importance.items()},
        others="dropped" if cfg.strategy == "no_share" else "shared",
        strategy=cfg.strategy,
        threshold=cfg.threshold,
        importance={t: [float(importance[t][layer]) for layer in layers[t]] for t in layers},
    )
