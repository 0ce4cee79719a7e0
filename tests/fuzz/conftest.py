"""Hypothesis profiles for the property tests in tests/fuzz.

- "ci" (default): a small, derandomized example budget (the same examples every run, so CI is
  deterministic) and no per-example deadline (the Triton interpreter's first call compiles).
- "long": many more examples, randomized; for a person hunting bugs:
  HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/fuzz -q
"""
import os

from hypothesis import HealthCheck, settings

# The repository's autouse `_seed` fixture (tests/conftest.py) is function-scoped; it reseeds the
# global RNG, which these tests never use (every tensor comes from a seeded torch.Generator), so
# hypothesis' warning about function-scoped fixtures does not apply.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
               database=None, print_blob=True)
settings.register_profile("ci", max_examples=6, derandomize=True, **_common)
settings.register_profile("long", max_examples=300, derandomize=False, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
