"""Hypothesis runs derandomized here, so CI sees the same examples every time (and no example database).

Pass ``--hypothesis-profile=proto-random`` to explore with fresh random examples instead, e.g. when hunting bugs:
``python -m pytest tests/proto --hypothesis-profile=proto-random --hypothesis-seed=N``.
"""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("proto", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("proto-random", deadline=None, print_blob=True)
settings.load_profile("proto")
