"""Reports of prompt search and comparison: HTML pages with their plots embedded, plus the PNGs beside them."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from lmtailor import crypto

_STYLE = ("body{font-family:sans-serif;max-width:70em;margin:2em auto}td,th{border:1px solid #ccc;padding:4px;"
          "vertical-align:top}table{border-collapse:collapse}pre{white-space:pre-wrap;margin:0}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return html.escape("" if v is None else str(v))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def search_plot(summary: dict[str, Any]) -> bytes:
    """Each candidate's score against the number of dev examples it was scored on (one line per candidate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmtailor.report import png_bytes

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    best = summary["best"]["id"]
    for row in summary["table"]:
        pts = sorted((int(n), s) for n, s in row.get("scores", {}).items())
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        is_best = row["id"] == best
        ax.plot(xs, ys, "o-" if is_best else ".-", color="#d62728" if is_best else "#1f77b4",
                alpha=1.0 if is_best else 0.35, lw=2 if is_best else 1, label="best" if is_best else None)
    ax.set_xscale("log")
    ax.set_xlabel("dev examples (successive-halving round)")
    ax.set_ylabel(f"dev {summary['metric']}")
    ax.set_title(f"prompt search: {summary['candidates']} candidates, {summary['calls']}/{summary['budget']} calls")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return png_bytes(fig)


def search_report(folder: Path, summary: dict[str, Any]) -> None:
    png = search_plot(summary)
    crypto.write_output(folder / "search.png", png)
    rows = "".join(
        f"<tr><td>{r['id']}</td><td>{_fmt(r['origin'])}</td><td>{r['k']}</td><td>{_fmt(r['strategy'])}</td>"
        f"<td>{_fmt(r['order'])}</td><td>{r['examples']}</td><td>{_fmt(r['score'])}</td>"
        f"<td>{_fmt(r['dropped_at'])}</td><td><pre>{html.escape(r['template'])}</pre></td></tr>"
        for r in summary["table"])
    b = summary["best"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>prompt search {html.escape(summary['task'])}
</title><style>{_STYLE}</style></head><body><h1>Prompt search: {html.escape(summary['task'])}</h1>
<p>Model {html.escape(summary['model'])}; {summary['dev_examples']} dev examples, {summary['pool_examples']} in the
few-shot pool; {summary['calls']} of {summary['budget']} model calls; {summary['seconds']} s.</p>
<p><b>Best</b>: candidate {b['id']} ({html.escape(b['origin'])}, {b['k']}-shot {_fmt(b['strategy'])},
order {_fmt(b['order'])}): dev {html.escape(summary['metric'])} {_fmt(b['score'])} on {b['examples']} examples.</p>
<pre>{html.escape(b['template'])}</pre>{_img(png, 'scores by round')}
<h2>Every candidate</h2><table><tr><th>id</th><th>instruction</th><th>shots</th><th>selection</th><th>order</th>
<th>dev examples</th><th>{html.escape(summary['metric'])}</th><th>dropped in round</th><th>template</th></tr>{rows}
</table></body></html>"""
    crypto.write_output(folder / "report.html", page)


def compare_plot(rows: list[dict[str, Any]], metrics: list[str], title: str) -> bytes:
    """Grouped bars: one group per system, one bar per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmtailor.report import png_bytes

    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(rows) + 2), 4), dpi=100)
    width = 0.8 / max(len(metrics), 1)
    for j, metric in enumerate(metrics):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(rows))]
        ys = [float(r["metrics"].get(metric, float("nan"))) for r in rows]
        bars = ax.bar(xs, ys, width, label=metric)
        for bar, y in zip(bars, ys, strict=True):
            if y == y:
                ax.annotate(f"{y:.3f}" if y <= 1 else f"{y:.1f}", (bar.get_x() + bar.get_width() / 2, y),
                            ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [r["system"] for r in rows], rotation=15 if len(rows) > 4 else 0)
    ax.set_ylabel("score (held-out)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return png_bytes(fig)


def compare_report(folder: Path, summary: dict[str, Any]) -> None:
    rows = summary["rows"]
    png = compare_plot(rows, summary["metrics"], f"{summary['task']}: {summary['examples']} held-out examples")
    crypto.write_output(folder / "compare.png", png)
    crypto.write_output(folder / "compare.md", compare_markdown(summary))
    head = "".join(f"<th>{html.escape(m)}</th>" for m in summary["metrics"])
    body = "".join(
        f"<tr><td>{html.escape(r['system'])}</td><td>{html.escape(r['kind'])}</td>"
        + "".join(f"<td>{_fmt(r['metrics'].get(m))}</td>" for m in summary["metrics"])
        + f"<td>{r.get('calls', '')}</td><td>{_fmt(r.get('seconds'))}</td><td>{html.escape(r['detail'])}</td></tr>"
        for r in rows)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>compare {html.escape(summary['task'])}</title>
<style>{_STYLE}</style></head><body><h1>Comparison: {html.escape(summary['task'])}</h1>
<p>{summary['examples']} held-out examples from {html.escape(summary['test'])}; model {html.escape(summary['model'])}.
</p><table><tr><th>system</th><th>kind</th>{head}<th>model calls</th><th>seconds</th><th>detail</th></tr>{body}
</table>{_img(png, 'comparison')}</body></html>"""
    crypto.write_output(folder / "report.html", page)


def compare_markdown(summary: dict[str, Any]) -> str:
    metrics = summary["metrics"]
    lines = ["| system | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for r in summary["rows"]:
        lines.append(f"| {r['system']} | " + " | ".join(_fmt(r["metrics"].get(m)) for m in metrics) + " |")
    return "\n".join(lines) + "\n"
