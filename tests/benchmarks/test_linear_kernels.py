"""benchmarks/linear_kernels.py: every form computes the linear it times, within its precision."""

from __future__ import annotations

import numpy as np

from benchmarks.linear_kernels import FORMS, measure


def test_every_form_computes_the_fp32_product_within_its_bits():
    weight = (np.random.default_rng(0).standard_normal((256, 384)) * 0.02).astype(np.float32)
    results = measure(weight, rows=[1, 3], threads=1, repeats=2)
    assert [r["rows"] for r in results] == [1, 3]
    bounds = {"fp32": 1e-6, "int8 b64": 0.02, "integer": 0.02, "int4 b32": 0.15, "int4 b128": 0.15}
    for r in results:
        errors = {form: r[form]["relative_error"] for form in FORMS}
        assert all(errors[f] < bounds[f] for f in FORMS), errors
        assert errors["int4 b32"] > errors["int8 b64"]  # the bits show: not one shared graph
        assert all(r[form]["ms"] > 0 for form in FORMS)
