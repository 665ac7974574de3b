"""Backtest the month-end forecast (``gateway.forecast``) on synthetic months.

Each scenario is a 30-day month (starting on a Monday) of daily spend with seeded noise; at
day 5, 10, 15, 20 and 25 the forecast sees the days before and projects the month's total.
The error is |projected - actual| / actual, averaged over 200 seeds, per method variant.
``python tools/forecast_backtest.py`` prints the Markdown tables in docs/forecast.md;
tests/test_forecast.py checks that the chosen method keeps its documented bound.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.forecast import project

DAYS = 30
CHECKPOINTS = (5, 10, 15, 20, 25)
SEEDS = 200
USD = 10**12


def _noise(rng: random.Random) -> float:
    return rng.uniform(0.8, 1.2)


SCENARIOS: dict[str, Callable[[int, random.Random], float]] = {
    "steady": lambda d, rng: 100 * _noise(rng),
    "growing (+3 %/day)": lambda d, rng: 50 * 1.03 ** d * _noise(rng),
    "weekday/weekend": lambda d, rng: (20 if (d - 1) % 7 >= 5 else 140) * _noise(rng),
    "one-day spike (10x on day 3)": lambda d, rng: (1000 if d == 3 else 100) * _noise(rng),
    "quiet start (days 1-7 at 10 %)": lambda d, rng: (10 if d <= 7 else 100) * _noise(rng),
}
VARIANTS: dict[str, dict[str, object]] = {
    "month-to-date mean": {"recent_weight": Fraction(0), "weekday": False, "spike_cap": None},
    "last 7 days": {"recent_weight": Fraction(1), "weekday": False, "spike_cap": None},
    "blend 50/50": {"recent_weight": Fraction(1, 2), "weekday": False, "spike_cap": None},
    "blend 30/70 + weekday + spike cap (chosen)": {},
}


def month(scenario: Callable[[int, random.Random], float], seed: int) -> list[int]:
    rng = random.Random(seed)
    return [int(scenario(d, rng) * USD // 100) for d in range(1, DAYS + 1)]


def error(days: list[int], checkpoint: int, **options: object) -> float:
    """Relative error of the projection made at the start of ``checkpoint``."""
    seen = {d: days[d - 1] for d in range(1, checkpoint)}
    result = project(sum(seen.values()), None, seen, DAYS, checkpoint, Fraction(0),
                     first_weekday=0, **options)  # type: ignore[arg-type]
    actual = sum(days)
    return abs(result.projected - actual) / actual


def table(variant: dict[str, object]) -> dict[str, list[float]]:
    out = {}
    for name, scenario in SCENARIOS.items():
        months = [month(scenario, seed) for seed in range(SEEDS)]
        out[name] = [sum(error(m, c, **variant) for m in months) / SEEDS for c in CHECKPOINTS]
    return out


def main() -> None:
    for label, variant in VARIANTS.items():
        print(f"\n**{label}** (mean absolute error of the month-end projection)\n")
        print("| scenario | " + " | ".join(f"day {c}" for c in CHECKPOINTS) + " |")
        print("|---|" + "---:|" * len(CHECKPOINTS))
        for name, errors in table(variant).items():
            print(f"| {name} | " + " | ".join(f"{e * 100:.1f} %" for e in errors) + " |")


if __name__ == "__main__":
    main()
