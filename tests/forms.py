"""Checks run in several forms (attention forms, precisions, modes): CI runs one representative
form of each, `make test` all of them."""

from __future__ import annotations

import pytest


def forms(values: list, representative: list) -> list:
    """Parametrize values (tuples for several names), those not in `representative` marked
    exhaustive (.ci/run deselects them)."""
    return [
        v
        if v in representative
        else pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.exhaustive)
        for v in values
    ]
