"""Parity report rendering: a readable table and markdown; JSON comes from ParityReport.to_dict."""

from __future__ import annotations

from .runner import ParityReport

COLUMNS = ("max_abs", "mean_abs", "tol_ratio", "top1", "cos_mean", "kl_mean", "cos_min", "kl_max")


def _fmt(metrics: dict[str, float]) -> list[str]:
    ratio = metrics.get("tol_ratio")
    return [
        f"{metrics['max_abs']:.3e}",
        f"{metrics['mean_abs']:.3e}",
        "-" if ratio is None else f"{ratio:.3f}",
        f"{metrics['top1']:.3f}",
        f"{metrics['cosine_mean']:.7f}",
        f"{metrics['kl_mean']:.3e}",
        f"{metrics['cosine_min']:.7f}",
        f"{metrics['kl_max']:.3e}",
    ]


def _rows(report: ParityReport) -> list[list[str]]:
    rows = [
        [s.case, "prefill" if s.step == 0 else str(s.step), *_fmt(s.metrics)] for s in report.steps
    ]
    rows.append(["ALL", "", *_fmt(report.summary)])
    if report.torch_fp32_summary:
        rows.append(["ALL, transformers fp32", "", *_fmt(report.torch_fp32_summary)])
    return rows


def _title(report: ParityReport) -> str:
    judge = "transformers" + (" float64" if report.reference_dtype == "float64" else "")
    judge += ", weights read by layer" if report.reference_load == "by-layer" else ""
    return f"{report.artifact} ({report.precision}) vs {judge} on {report.reference}"


def extreme(report: ParityReport) -> str:
    """Where the largest KL is: a report line, not a bound (the extremes grow with the rows)."""
    step, token = report.extreme_row()
    where = "prefill" if step.step == 0 else f"decode step {step.step}"
    return (
        f"largest KL {step.metrics['kl_max']:.3g}: {step.case}, {where}, row "
        f"{step.metrics['worst_row']} (input token {token})"
    )


def verdict(report: ParityReport) -> str:
    if report.passed:
        return f"PASS ({report.preset} preset)"
    worst = report.worst_step()
    where = f"{worst.case}, {'prefill' if worst.step == 0 else f'decode step {worst.step}'}"
    return f"FAIL ({report.preset} preset): {'; '.join(report.failures)}; worst: {where}"


def table(report: ParityReport) -> str:
    header = ["case", "step", *COLUMNS]
    rows = _rows(report)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    tol = ", ".join(f"{k} {v:g}" for k, v in report.tolerance.to_dict().items() if v is not None)
    return "\n".join(
        [
            f"parity: {_title(report)}",
            f"tolerance: {tol}",
            line(header),
            line(["-" * w for w in widths]),
            *map(line, rows),
            extreme(report),
            verdict(report),
        ]
    )


def markdown(report: ParityReport) -> str:
    header = ["case", "step", *COLUMNS]
    body = ["| " + " | ".join(r) + " |" for r in _rows(report)]
    return "\n".join(
        [
            f"# Parity: {_title(report)}",
            "",
            f"Precision {report.precision}.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *body,
            "",
            extreme(report) + ".",
            "",
            f"**{verdict(report)}**",
            "",
        ]
    )
