"""Suite-wide settings.

Hypothesis tests check properties, never speed: its per-example deadline (200 ms by
default) turned a test that renders a whole Envoy config into a failure whenever the
2-core CI machine was busy. Speed is measured in `scripts/bench`, not asserted here.
"""

from hypothesis import settings

settings.register_profile("gateway", deadline=None)
settings.load_profile("gateway")
