"""Run reports: a loss-curve PNG and a short self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from lmtailor.config import RunConfig, dump_config
from lmtailor.io import atomic_write_bytes, atomic_write_text


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


def write_report(run_dir: Path, cfg: RunConfig, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    png = loss_plot(history, f"{cfg.name}: {cfg.method} on {cfg.base_model}") if history else b""
    if png:
        atomic_write_bytes(run_dir / "loss.png", png)
    before, after = summary.get("before", {}), summary.get("after", {})
    rows = "".join(
        f"<tr><td>{k}</td><td>{_fmt(before.get(k, ''))}</td><td>{_fmt(after.get(k, ''))}</td></tr>"
        for k in ("loss", "perplexity", "exact_match", "chrf") if k in before or k in after
    )
    samples = "".join(
        f"<tr><td>{html.escape(b['prompt'])}</td><td><code>{html.escape(b['reference'])}</code></td>"
        f"<td><code>{html.escape(b['prediction'])}</code></td><td><code>{html.escape(a['prediction'])}</code></td></tr>"
        for b, a in list(zip(before.get("samples", []), after.get("samples", []), strict=False))[:10]
    )
    facts = "".join(f"<li>{html.escape(k)}: {_fmt(v)}</li>" for k, v in summary.items()
                    if k not in ("before", "after", "data", "privacy"))
    data = "".join(f"<li>{html.escape(k)}: {_fmt(v)}</li>" for k, v in summary.get("data", {}).items())
    privacy = ""
    if summary.get("privacy"):
        from lmtailor.privacy.scrub import audit_html

        privacy = audit_html(summary["privacy"])
    img = f'<img alt="loss curve" src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>lmtailor run {html.escape(cfg.name)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{border:1px solid #ccc;padding:4px}}
table{{border-collapse:collapse}}code{{white-space:pre-wrap}}</style></head><body>
<h1>Run {html.escape(cfg.name)}</h1><ul>{facts}</ul><h2>Data</h2><ul>{data}</ul>
<h2>Before / after (held-out split)</h2><table><tr><th>metric</th><th>before</th><th>after</th></tr>{rows}</table>
{privacy}<h2>Loss</h2>{img}
<h2>Sample answers</h2><table><tr><th>prompt</th><th>reference</th><th>before</th><th>after</th></tr>{samples}</table>
<h2>Resolved config</h2><pre>{html.escape(dump_config(cfg))}</pre></body></html>
"""
    atomic_write_text(run_dir / "report.html", page)
