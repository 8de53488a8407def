"""Task run reports: before/after table of task metrics, validation metric curves, confusion matrix, samples.

The training loop calls an objective's evaluate hook with label "before:" and "after:"; the task objectives
keep the "before" metrics in `<run>/eval_before.json` and, after training, write `<run>/task_report.html`
(and `metric_curves.png`) next to the loop's own report.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from lmtailor.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from lmtailor.report import compared_metrics, fmt_metric, png_bytes
from lmtailor.tasks.metrics import higher_is_better


def curves_png(history: list[dict[str, Any]]) -> bytes:
    """PNG of every validation metric recorded during training (one panel each) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in history for k in r if k.startswith("val_") and k != "val_perplexity"})
    if not keys:
        return b""
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        pts = [(r["step"], r[key]) for r in history if key in r and not math.isnan(r[key])]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-")
        ax.set_title(f"{key} ({'higher' if higher_is_better(key) else 'lower'} is better)", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return png_bytes(fig)


def _img(path: Path | bytes, alt: str) -> str:
    data = path if isinstance(path, bytes) else (path.read_bytes() if path.is_file() else b"")
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(data).decode()}">' if data else ""


def record_eval(run_dir: Path, label: str, metrics: dict[str, Any], images: list[str] | None = None) -> None:
    """Called by a task evaluate hook: keep "before:" metrics; on "after:" write the task report.

    The printed before/after table is the training loop's (evaluate.comparison_table), which shows the same metrics.

    Args:
        run_dir: the run folder.
        label: the evaluate hook's label ("before:", "after:", anything else is ignored).
        metrics: what the hook returns (scalars, and optionally "samples": [{"prompt", "reference", "prediction"}]).
        images: file names in run_dir shown in the report (e.g. the confusion matrix PNGs).
    """
    if label.startswith("before"):
        atomic_write_json(run_dir / "eval_before.json", metrics)
        return
    if not label.startswith("after"):
        return
    before_file = run_dir / "eval_before.json"
    before = json.loads(before_file.read_text()) if before_file.is_file() else {}
    history_file = run_dir / "history.jsonl"
    history = [json.loads(x) for x in history_file.read_text().splitlines() if x] if history_file.is_file() else []
    curves = curves_png(history)
    if curves:
        atomic_write_bytes(run_dir / "metric_curves.png", curves)
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{fmt_metric(k, b)}</td><td>{fmt_metric(k, a)}</td><td>"
                   f"{fmt_metric(k, a - b, sign=True) if a is not None and b is not None else ''}</td></tr>"
                   for k, b, a in compared_metrics(before, metrics) if a is not None)
    per_class = metrics.get("per_class") or {}
    classes = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{s.get(k, 0):.3f}</td>" for k in
                      ("precision", "recall", "f1-score")) + f"<td>{int(s.get('support', 0))}</td></tr>"
                      for name, s in per_class.items())
    samples = "".join(
        f"<tr><td><code>{html.escape(s_a['prompt'])}</code></td><td><code>{html.escape(s_a['reference'])}</code></td>"
        f"<td><code>{html.escape(s_b.get('prediction', ''))}</code></td>"
        f"<td><code>{html.escape(s_a['prediction'])}</code></td></tr>"
        for s_a, s_b in zip(metrics.get("samples", [])[:20],
                            before.get("samples", []) + [{}] * 20, strict=False))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>task report {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}td,th{{border:1px solid #ccc;padding:4px}}
table{{border-collapse:collapse}}code{{white-space:pre-wrap}}</style></head><body>
<h1>Task report: {html.escape(run_dir.name)}</h1>
<h2>Before / after (held-out split)</h2><table><tr><th>metric</th><th>before</th><th>after</th><th>change</th></tr>
{rows}</table>
{"<h2>Per class (after)</h2><table><tr><th>label</th><th>precision</th><th>recall</th><th>F1</th><th>support</th>"
 "</tr>" + classes + "</table>" if classes else ""}
{"".join(_img(run_dir / name, name) for name in images or [])}
<h2>Validation metrics during training</h2>{_img(curves, "metric curves")}
{"<h2>Sample predictions</h2><table><tr><th>source</th><th>reference</th><th>before</th><th>after</th></tr>"
 + samples + "</table>" if samples else ""}
</body></html>
"""
    atomic_write_text(run_dir / "task_report.html", page)
