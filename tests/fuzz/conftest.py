"""Fuzz settings: example count and seed from the environment, printed for reproduction.

RAFTKV_FUZZ_EXAMPLES (default 75) examples per property; RAFTKV_FUZZ_SEED (default fixed,
`random` for a fresh one) seeds every property. A longer run:
    RAFTKV_FUZZ_EXAMPLES=5000 RAFTKV_FUZZ_SEED=random python -m pytest tests/fuzz
A failure prints the falsifying example and a reproduce blob (hypothesis), and this seed.
"""
from __future__ import annotations

import os
import random

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("RAFTKV_FUZZ_EXAMPLES", "75"))
_SEED_ENV = os.environ.get("RAFTKV_FUZZ_SEED", "").strip()
SEED = random.SystemRandom().randrange(1 << 32) if _SEED_ENV == "random" else int(_SEED_ENV or "20260606")

settings.register_profile(
    "raftkv-fuzz",
    max_examples=EXAMPLES,
    deadline=None,                 # real processes: timing varies, never a flaky deadline
    database=None,                 # reproduction comes from the seed, not a local example store
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.large_base_example],
)
FUZZ = settings.get_profile("raftkv-fuzz")


def pytest_terminal_summary(terminalreporter) -> None:
    """Printed after the run (also with -q), so a failure can be replayed."""
    if any("tests/fuzz/" in getattr(r, "nodeid", "") for stat in terminalreporter.stats.values() for r in stat):
        terminalreporter.write_line(f"raftkv fuzz: RAFTKV_FUZZ_EXAMPLES={EXAMPLES} RAFTKV_FUZZ_SEED={SEED} "
                                    f"(set both to reproduce this run)")
