"""Named tolerance presets per precision; every threshold can be overridden on the command line."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Tolerance:
    """A run passes when every aggregate satisfies its bound (None: not checked)."""

    max_abs: float | None = None
    cosine: float | None = None
    top1: float | None = None
    kl: float | None = None

    def failures(self, metrics: dict[str, float]) -> list[str]:
        """The bounds `metrics` violates, as readable strings (empty: pass)."""
        out = []
        if self.max_abs is not None and metrics["max_abs"] > self.max_abs:
            out.append(f"max_abs {metrics['max_abs']:.3g} > {self.max_abs:g}")
        if self.cosine is not None and metrics["cosine"] < self.cosine:
            out.append(f"cosine {metrics['cosine']:.6f} < {self.cosine:g}")
        if self.top1 is not None and metrics["top1"] < self.top1:
            out.append(f"top1 {metrics['top1']:.3f} < {self.top1:g}")
        if self.kl is not None and metrics["kl"] > self.kl:
            out.append(f"kl {metrics['kl']:.3g} > {self.kl:g}")
        return out

    def override(self, **values: float | None) -> Tolerance:
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs=1e-4, cosine=0.99999, top1=1.0),
    "fp16": Tolerance(cosine=0.999, top1=0.99),
    "int8-weight": Tolerance(cosine=0.999, top1=0.95),
    "int8-smoothquant": Tolerance(cosine=0.99, top1=0.90),
}


def preset_for(precision: str, quantization: str | None = None) -> str:
    """The preset name matching an artifact's manifest."""
    return quantization if quantization in PRESETS else precision
