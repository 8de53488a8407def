"""Run reports: plots (loss, validation metric curves, confusion matrix) and self-contained HTML pages (the run
report, and the task report of classification and seq2seq runs)."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmtailor.config import RunConfig, dump_config
from lmtailor.io import atomic_write_bytes, atomic_write_text
from lmtailor.metrics import higher_is_better


def loss_plot(history: list[dict[str, Any]], title: str = "training") -> bytes:
    """PNG bytes of the training loss (and validation loss where measured) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in history]
    ax.plot(steps, [r["loss"] for r in history], label="train loss", color="#1f77b4", alpha=0.8)
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if val:
        ax.plot(*zip(*val, strict=False), "o-", label="validation loss", color="#d62728")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return png_bytes(fig)


# per-step series objectives log (ctx.step_log), plotted in report.html when a run has them: (key, title)
STEP_SERIES = (("reward_mean", "reward (mean ± std of the samples)"), ("kl", "KL to the reference"),
               ("reward_margin", "reward margin (chosen - rejected)"), ("disc_accuracy", "discriminator accuracy"),
               ("answer_length", "answer length (tokens)"), ("looping", "share of looping answers"))


def step_series_png(history: list[dict[str, Any]]) -> bytes:
    """One panel per STEP_SERIES key the history holds (reward with its std band), or b"" when it holds none."""
    keys = [(k, t) for k, t in STEP_SERIES if any(k in r for r in history)]
    if not keys:
        return b""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), dpi=100, squeeze=False)
    for ax, (key, title) in zip(axes[0], keys, strict=True):
        pts = [(r["step"], r[key], r.get("reward_std", 0.0)) for r in history
               if key in r and not math.isnan(r[key])]
        if pts:
            steps, values, spread = zip(*pts, strict=True)
            ax.plot(steps, values, "-", lw=1.2)
            if key == "reward_mean":
                ax.fill_between(steps, [v - s for v, s in zip(values, spread, strict=True)],
                                [v + s for v, s in zip(values, spread, strict=True)], alpha=0.2)
            if key == "disc_accuracy":
                ax.axhline(0.5, color="#888", lw=0.8, ls="--")  # chance: the judge cannot tell them apart
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    return png_bytes(fig)


def png_bytes(fig: Any) -> bytes:
    """PNG bytes of a matplotlib figure, which is closed afterwards."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return html.escape(str(v))


# Counts, not scores: left out of before/after tables.
NOT_COMPARED = ("examples", "eval_tokens")
# Shown as percentages; other metrics in [0, 1] (F1, ROUGE) keep three decimals, BLEU/chrF are already 0-100.
METRIC_FORMATS = {"loss": "{:.3f}", "perplexity": "{:.2f}", "accuracy": "{:.1%}", "exact_match": "{:.1%}",
                  "bleu": "{:.1f}", "chrf": "{:.1f}", "looping": "{:.1%}", "tool_call_parsed": "{:.1%}",
                  "tool_name_accuracy": "{:.1%}", "tool_args_exact": "{:.1%}", "tool_args_chrf": "{:.1f}"}


def fmt_metric(name: str, value: float | None, sign: bool = False) -> str:
    """A metric value as tables show it ('' for None); sign=True for a change (+/-)."""
    if value is None:
        return ""
    if math.isnan(value):
        return "nan"
    text = METRIC_FORMATS.get(name, "{:.3f}").format(value)
    return ("+" + text) if sign and value >= 0 else text


def compared_metrics(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """(name, before, after) for every scalar metric of either evaluation, loss and perplexity first; a side
    that lacks the metric gives None. Lists, dicts (per-class report, samples) and counts are left out."""
    def scalars(m: dict[str, Any]) -> dict[str, float]:
        return {k: float(v) for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)
                and k not in NOT_COMPARED}

    b, a = scalars(before), scalars(after)
    first = [k for k in ("loss", "perplexity") if k in a or k in b]
    names = first + [k for k in dict.fromkeys([*a, *b]) if k not in first]
    return [(k, b.get(k), a.get(k)) for k in names]


def write_report(run_dir: Path, cfg: RunConfig, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    png = loss_plot(history, f"{cfg.name}: {cfg.method} on {cfg.base_model}") if history else b""
    if png:
        atomic_write_bytes(run_dir / "loss.png", png)
    series = step_series_png(history)
    if series:
        atomic_write_bytes(run_dir / "training_curves.png", series)
    before, after = summary.get("before", {}), summary.get("after", {})
    baselines: dict[str, dict[str, float]] = summary.get("baselines") or {}
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{fmt_metric(k, m.get(k))}</td>" for m in baselines.values())
        + f"<td>{fmt_metric(k, b)}</td><td>{fmt_metric(k, a)}</td>"
        f"<td>{fmt_metric(k, a - b, sign=True) if a is not None and b is not None else ''}</td></tr>"
        for k, b, a in compared_metrics(before, after)
    )
    heads = "".join(f"<th>baseline: {html.escape(n)}</th>" for n in baselines)
    judged = f"<p><b>{html.escape(summary['verdict'])}</b></p>" if summary.get("verdict") else ""
    task_link = ('<p>Task report (validation metric curves; per class and confusion matrix, or sample predictions): '
                 '<a href="task_report.html">task_report.html</a></p>'
                 if (run_dir / "task_report.html").is_file() else "")
    samples = "".join(
        f"<tr><td>{html.escape(b['prompt'])}</td><td><code>{html.escape(b['reference'])}</code></td>"
        f"<td><code>{html.escape(b['prediction'])}</code></td><td><code>{html.escape(a['prediction'])}</code></td></tr>"
        for b, a in list(zip(before.get("samples", []), after.get("samples", []), strict=False))[:10]
    )
    facts = "".join(f"<li>{html.escape(k)}: {_fmt(v)}</li>" for k, v in summary.items()
                    if k not in ("before", "after", "data", "privacy", "baselines", "verdict"))
    data = "".join(f"<li>{html.escape(k)}: {_fmt(v)}</li>" for k, v in summary.get("data", {}).items())
    privacy = ""
    if summary.get("privacy"):
        from lmtailor.privacy.scrub import audit_html

        privacy = audit_html(summary["privacy"])
    img = f'<img alt="loss curve" src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else ""
    curves = f"<h2>Per-step curves</h2>{_img(series, 'per-step curves')}" if series else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>lmtailor run {html.escape(cfg.name)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{border:1px solid #ccc;padding:4px}}
table{{border-collapse:collapse}}code{{white-space:pre-wrap}}</style></head><body>
<h1>Run {html.escape(cfg.name)}</h1><ul>{facts}</ul><h2>Data</h2><ul>{data}</ul>
<h2>Before / after (held-out split)</h2><table><tr><th>metric</th>{heads}<th>before</th><th>after</th><th>change</th>
</tr>
{rows}</table>{judged}{task_link}
{privacy}<h2>Loss</h2>{img}
{curves}
<h2>Sample answers</h2><table><tr><th>prompt</th><th>reference</th><th>before</th><th>after</th></tr>{samples}</table>
<h2>Resolved config</h2><pre>{html.escape(dump_config(cfg))}</pre></body></html>
"""
    atomic_write_text(run_dir / "report.html", page)


def _img(path: Path | bytes, alt: str) -> str:
    data = path if isinstance(path, bytes) else (path.read_bytes() if path.is_file() else b"")
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(data).decode()}">' if data else ""


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


def confusion_png(matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str = "") -> bytes:
    """PNG of a confusion matrix (rows: truth, columns: prediction) with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    size = min(2.5 + 0.5 * n, 14)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=100)
    im = ax.imshow(matrix, cmap="Blues")
    top = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_xticks(range(n), labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return png_bytes(fig)


def write_task_report(run_dir: Path, before: dict[str, Any], metrics: dict[str, Any], history: list[dict[str, Any]],
                      images: list[str] | None = None) -> None:
    """`task_report.html` (and `metric_curves.png`) of a task run: before/after task metrics, per-class scores,
    images already written in run_dir (e.g. confusion matrices), validation curves and sample predictions.

    Args:
        run_dir: the run folder.
        before, metrics: the evaluations before and after training (scalars, and optionally "per_class" and
            "samples": [{"prompt", "reference", "prediction"}]).
        history: the training log (its val_* records become the curves).
        images: file names in run_dir to show.
    """
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


def _field(label: str, text: str, width: int = 100) -> list[str]:
    """A labelled text, its later lines indented under the first; blank lines dropped, long lines cut with ..."""
    rows = [r if len(r) <= width else r[:width - 3] + "..." for r in str(text).splitlines() if r.strip()] or [""]
    return [label + rows[0]] + [" " * len(label) + r for r in rows[1:]]


def comparison_table(before: dict[str, Any], after: dict[str, Any], samples: int = 3,
                     baselines: dict[str, dict[str, float]] | None = None, verdict: str | None = None) -> str:
    """A plain-text table of every scalar metric both evaluations report (loss, and the task metrics: accuracy,
    macro_f1, bleu, chrf, rougeL, exact_match, ...) with a column per baseline on the same split, then the verdict
    against the baselines and a few sample answers."""
    names = list(baselines or {})
    rows = [("metric", *names, "before", "after", "change")]
    for k, b, a in compared_metrics(before, after):
        if a is None or b is None:
            continue
        base = [fmt_metric(k, (baselines or {})[n].get(k)) for n in names]
        rows.append((k, *base, fmt_metric(k, b), fmt_metric(k, a), fmt_metric(k, a - b, sign=True)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if verdict:
        lines += ["", verdict]
    for s_before, s_after in list(zip(before.get("samples", []), after.get("samples", []), strict=False))[:samples]:
        lines += [""] + _field("Q: ", s_before.get("question", s_before["prompt"]))
        if s_before.get("shown"):
            lines += _field("   shown:     ", s_before["shown"])
        for label, text in (("reference", s_before["reference"]), ("before", s_before["prediction"]),
                            ("after", s_after["prediction"])):
            lines += _field(f"   {label + ':':11}", text)
    return "\n".join(lines)


def likely_reasons(history: list[dict[str, Any]], stats: dict[str, Any], metric: str) -> list[str]:
    """Why a run may fall short, read from the run itself: loss or the validation metric still improving at the end,
    few optimizer steps, examples cut at max_length."""
    reasons = []
    losses = [r["loss"] for r in history if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
    if len(losses) >= 10:
        k = max(2, len(losses) // 10)
        earlier, last = sum(losses[-2 * k:-k]) / k, sum(losses[-k:]) / k
        if last < earlier * 0.98:
            reasons.append(f"the training loss was still falling at the end ({earlier:.3f} -> {last:.3f} over the "
                           f"last {2 * k} steps): train longer (epochs, max_steps or budget)")
    curve = [r[f"val_{metric}"] for r in history if f"val_{metric}" in r]
    if len(curve) >= 2:
        best = max(curve) if higher_is_better(metric) else min(curve)
        if curve[-1] == best and curve[-1] != curve[0]:
            reasons.append(f"validation {metric} was still improving at the last evaluation")
    if history and len(history) < 100:
        reasons.append(f"only {len(history)} optimizer steps")
    cut, total = stats.get("train_truncated"), stats.get("train_examples") or stats.get("train_pairs")
    if cut and total and cut / total > 0.05:
        reasons.append(f"{cut / total:.0%} of the training examples were cut at max_length")
    return reasons


def verdict(after: dict[str, Any], baselines: dict[str, dict[str, float]], metric: str | None,
            reasons: list[str] | None = None) -> str | None:
    """One paragraph: does the tuned model beat the best baseline on `metric`; if not, the likely reasons."""
    if not metric or metric not in after or not baselines:
        return None
    scored = {n: m[metric] for n, m in baselines.items() if isinstance(m.get(metric), float)
              and math.isfinite(m[metric])}
    if not scored:
        return None
    sign = 1.0 if higher_is_better(metric) else -1.0
    name, value = max(scored.items(), key=lambda kv: sign * kv[1])
    ours = float(after[metric])
    if abs(ours - value) < 1e-9:
        return (f"The tuned model ties with the baseline {name} on {metric}: {fmt_metric(metric, ours)} (no gain "
                f"from tailoring on this split).")
    if sign * (ours - value) > 0:
        return (f"The tuned model beats the best baseline on {metric}: {fmt_metric(metric, ours)} vs "
                f"{fmt_metric(metric, value)} ({name}).")
    why = "; ".join(reasons or []) or "no sign of undertraining in the run: the baseline may suit this data better"
    return (f"The tuned model does NOT beat the baseline {name} on {metric}: {fmt_metric(metric, ours)} vs "
            f"{fmt_metric(metric, value)}. Likely reasons: {why}.")
