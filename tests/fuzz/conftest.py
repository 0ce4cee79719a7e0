"""Hypothesis profiles for the property tests in tests/fuzz.

- "ci" (default): a small, derandomized example budget (the same examples every run, so CI is
  deterministic) and no per-example deadline (the Triton interpreter's first call compiles).
- "long": many more examples, randomized; for a person hunting bugs:
  HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/fuzz -q
- HYPOTHESIS_MAX_EXAMPLES=N overrides either profile's example budget (the Triton interpreter is
  ~50x slower than the cpu kernels, so a bounded long run of the Triton half uses a smaller N):
  HYPOTHESIS_PROFILE=long HYPOTHESIS_MAX_EXAMPLES=40 .venv/bin/python -m pytest tests/fuzz -q -k triton
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
if os.environ.get("HYPOTHESIS_MAX_EXAMPLES"):
    _n = int(os.environ["HYPOTHESIS_MAX_EXAMPLES"])
    if _n < 1:
        raise ValueError(f"HYPOTHESIS_MAX_EXAMPLES must be a positive integer, got {_n}")
    settings.register_profile("override", settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci")),
                              max_examples=_n)
    settings.load_profile("override")
