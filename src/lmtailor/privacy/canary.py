"""Memorization check: plant canary secrets in training data, then measure how much the trained model knows them.

A canary is a sentence `prefix + secret` (e.g. "the vault code for case 3 is:482913") where the secret is drawn at
random from a format (`dddddd`: six digits). `plant_canaries` adds each canary to a data file a chosen number of
times (0 is a control that is never seen). After training, `canary_report` ranks the true secret among N random
secrets of the same format by the model's log-likelihood of the whole canary record (Carlini et al., "The Secret
Sharer", 2019): exposure = log2(N + 1) - log2(rank), from 0 (no better than chance) to log2(N + 1) (the canary
beats every candidate). It also checks whether greedy decoding from the prefix writes the secret out.

Each repetition gets its own prompt ("Case file 2, note 3."), because the data stage drops exact duplicates.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmtailor.errors import ConfigError, DataError

# A pattern character stands for a random character of its class; anything else is kept as written.
PATTERN_CLASSES = {"d": string.digits, "x": "0123456789abcdef", "a": string.ascii_lowercase,
                   "A": string.ascii_uppercase}
CHAT_FORMATS = ("chat", "alpaca", "prompt_completion", "text")


@dataclass
class Canary:
    """One planted secret. `context(k)` is the prompt of its k-th copy; copy 0's prompt is used to measure."""

    prefix: str
    secret: str
    pattern: str
    repeats: int = 0
    tag: str = "Case file"

    def context(self, k: int = 0) -> str:
        return f"{self.tag}, note {k + 1}."

    @property
    def sentence(self) -> str:
        return self.prefix + self.secret


def random_secret(pattern: str, rng: random.Random) -> str:
    """A random string of `pattern`'s shape: `ddd-dd-dddd` -> `482-19-3310`."""
    return "".join(rng.choice(PATTERN_CLASSES[c]) if c in PATTERN_CLASSES else c for c in pattern)


def make_canaries(repeats: list[int], pattern: str = "dddddd", seed: int = 0) -> list[Canary]:
    """One canary per entry of `repeats` (how often it is planted; 0 = never, a control), with distinct prefixes."""
    if not any(c in PATTERN_CLASSES for c in pattern):
        raise ConfigError(f"canary pattern '{pattern}' has no random character",
                          "use d (digit), x (hex), a (lowercase), A (uppercase), e.g. dddddd")
    rng = random.Random(seed)
    subjects = ["vault", "door", "locker", "server", "safe", "alarm", "gate", "badge"]
    return [Canary(prefix=f"the {subjects[i % len(subjects)]} code for case {i + 1} is:",
                   secret=random_secret(pattern, rng), pattern=pattern, repeats=r, tag=f"Case file {i + 1}")
            for i, r in enumerate(repeats)]


def _record(c: Canary, k: int, fmt: str) -> dict[str, Any]:
    context = c.context(k)
    if fmt == "chat":
        return {"messages": [{"role": "user", "content": context}, {"role": "assistant", "content": c.sentence}]}
    if fmt == "alpaca":
        return {"instruction": context, "output": c.sentence}
    if fmt == "prompt_completion":
        return {"prompt": context, "completion": c.sentence}
    return {"text": f"{context} {c.sentence}"}


def plant_canaries(path: str | Path, out: str | Path, canaries: list[Canary], seed: int = 0,
                   canaries_out: str | Path | None = None) -> Path:
    """Write `path`'s records plus `repeats` copies of each canary, shuffled in, to `out` (JSON Lines).

    The canary list goes to `canaries_out` (default `<out stem>.canaries.yaml`; YAML is never read as training
    data, so the file can sit next to `out`). Keep it: `canary_report` needs it.

    Returns:
        The path of the canary list.

    Raises:
        DataError: the input cannot be read. ConfigError: its format cannot hold a canary.
    """
    import json

    import yaml

    from lmtailor.data.formats import detect_format
    from lmtailor.data.sources import read_records
    from lmtailor.io import atomic_write_text

    records = list(read_records(str(path)))
    bad = [f"{r.source}: {r.problem}" for r in records if r.problem]
    if bad:
        raise DataError(f"{len(bad)} unreadable record(s) in {path}", problems=bad[:20], count=len(bad))
    rows = [r.data for r in records]
    fmt = detect_format(rows[0]) if rows else "chat"
    if fmt not in CHAT_FORMATS:
        raise ConfigError(f"cannot plant canaries in {fmt}-format data",
                          "canaries go into chat, alpaca, prompt_completion or text data")
    rows += [_record(c, k, fmt) for c in canaries for k in range(c.repeats)]
    random.Random(seed).shuffle(rows)
    out = Path(out)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    listing = Path(canaries_out) if canaries_out else out.with_name(f"{out.stem}.canaries.yaml")
    atomic_write_text(listing, yaml.safe_dump({"format": fmt, "canaries": [asdict(c) for c in canaries]},
                                              sort_keys=False, allow_unicode=True))
    return listing


def load_canaries(path: str | Path) -> tuple[list[Canary], str]:
    """(canaries, data format) from a list written by `plant_canaries`."""
    import yaml

    from lmtailor.config import load_yaml

    p = Path(path)
    try:
        doc = load_yaml(p.read_text(encoding="utf-8"))
        return [Canary(**c) for c in doc["canaries"]], doc.get("format", "chat")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{p}: not a canary list written by plant_canaries ({e})",
                          "pass the .canaries.yaml file written when the canaries were planted") from None


# ---- measuring ------------------------------------------------------------------------------------------------

def _tokenized(tok: Any, c: Canary, secret: str, fmt: str, system: str | None) -> tuple[list[int], list[int]]:
    from lmtailor.data.example import Example
    from lmtailor.render import tokenize_example

    sentence = c.prefix + secret
    if fmt == "text":
        ex = Example(text=f"{c.context(0)} {sentence}")
    else:
        head = [{"role": "system", "content": system}] if system else []
        ex = Example(messages=[*head, {"role": "user", "content": c.context(0)},
                               {"role": "assistant", "content": sentence}])
    seq = tokenize_example(tok, ex, max_length=10_000)[0]
    return seq.input_ids, seq.labels


def _scores(model: Any, seqs: list[tuple[list[int], list[int]]], pad_id: int, batch: int = 64) -> list[float]:
    """Sum of log p(token) over the supervised tokens of each sequence, as the training loss counts them."""
    import torch

    from lmtailor.render import IGNORE

    device = next(model.parameters()).device
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            chunk = seqs[i:i + batch]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, (a, b) in enumerate(chunk):
                ids[j, :len(a)], labels[j, :len(b)], mask[j, :len(a)] = torch.tensor(a), torch.tensor(b), 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
            logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V) predicts tokens 1..T-1
            target = labels[:, 1:].to(device)  # (B, T-1)
            keep = target != IGNORE
            picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            out += (picked * keep).sum(-1).tolist()
    return out


def _greedy(model: Any, tok: Any, c: Canary, fmt: str, system: str | None) -> str:
    """The canary's prefix followed by what greedy decoding writes after it (enough tokens for the secret)."""
    import torch

    from lmtailor.render import IGNORE

    ids, labels = _tokenized(tok, c, c.secret, fmt, system)
    start = 0 if fmt == "text" else next(i for i, lab in enumerate(labels) if lab != IGNORE)
    target = f"{c.context(0)} {c.prefix}" if fmt == "text" else c.prefix
    # Feed the longest run of training tokens whose text stays inside the prefix: a token may straddle the
    # prefix/secret boundary, and the model must see exactly the tokens it was trained on.
    cut = start
    while cut < len(ids) and target.startswith(tok.decode(ids[start:cut + 1], skip_special_tokens=True)):
        cut += 1
    n_new = len(tok(c.secret, add_special_tokens=False)["input_ids"]) + 4
    x = torch.tensor([ids[:cut]], device=next(model.parameters()).device)
    with torch.no_grad():
        for _ in range(n_new):
            nxt = model(input_ids=x).logits[0, -1].argmax()  # (V,) -> ()
            if nxt.item() == tok.eos_token_id:
                break
            x = torch.cat([x, nxt.view(1, 1)], dim=1)
    return tok.decode(x[0, start:].tolist(), skip_special_tokens=True)


def exposure(rank: int, n_total: int) -> float:
    """log2(n_total) - log2(rank): bits by which the model singles out the true secret."""
    return math.log2(n_total) - math.log2(rank)


def measure(model: Any, tok: Any, canaries: list[Canary], fmt: str = "chat", n_candidates: int = 1000,
            seed: int = 0, system: str | None = None) -> list[dict[str, Any]]:
    """Exposure and greedy reproduction of each canary under a loaded model."""
    rng = random.Random(seed)
    results = []
    model.eval()
    for c in canaries:
        space = math.prod(len(PATTERN_CLASSES[ch]) for ch in c.pattern if ch in PATTERN_CLASSES)
        want = min(n_candidates, space - 1)
        others: set[str] = set()
        while len(others) < want:
            s = random_secret(c.pattern, rng)
            if s != c.secret:
                others.add(s)
        candidates = [c.secret, *sorted(others)]
        scores = _scores(model, [_tokenized(tok, c, s, fmt, system) for s in candidates], tok.pad_token_id or 0)
        rank = 1 + sum(s > scores[0] for s in scores[1:])
        generated = _greedy(model, tok, c, fmt, system)
        prefix_text = f"{c.context(0)} {c.prefix}" if fmt == "text" else c.prefix
        results.append({
            "prefix": c.prefix, "secret": c.secret, "repeats": c.repeats, "candidates": len(candidates),
            "rank": rank, "exposure": round(exposure(rank, len(candidates)), 3),
            "max_exposure": round(math.log2(len(candidates)), 3),
            "log_likelihood": round(scores[0], 4),
            "greedy_reproduces": generated.startswith(prefix_text + c.secret),
            "greedy_text": generated[:200],
        })
    return results


def canary_report(run_dir: str | Path, canaries: list[Canary] | str | Path, n_candidates: int = 1000,
                  seed: int = 0, fmt: str | None = None, out: str | Path | None = None) -> dict[str, Any]:
    """Measure every canary against the model a run produced; also written to `<run>/privacy_canaries.json`.

    Args:
        run_dir: a run folder (or model folder) to load.
        canaries: the canaries, or the path of the list `plant_canaries` wrote.
        n_candidates: random secrets each canary is ranked against.
        seed: seed of the candidate draw.
        fmt: data format the canaries were planted in (read from the list file when given a path).
        out: where to write the report (default `<run_dir>/privacy_canaries.json`; "" to skip).

    Returns:
        {"run", "candidates", "canaries": [{prefix, secret, repeats, rank, exposure, max_exposure,
        greedy_reproduces, ...}], "memorized": number with greedy_reproduces or exposure above half the maximum}.
    """
    from lmtailor.io import atomic_write_json
    from lmtailor.runs import Run

    if not isinstance(canaries, list):
        canaries, listed_fmt = load_canaries(canaries)
        fmt = fmt or listed_fmt
    run = Run.open(run_dir)
    model, tok = run.load()
    results = measure(model, tok, canaries, fmt or "chat", n_candidates, seed, run.system_prompt)
    report = {
        "run": str(run_dir), "candidates": n_candidates, "canaries": results,
        "memorized": sum(r["greedy_reproduces"] or r["exposure"] > r["max_exposure"] / 2 for r in results),
    }
    if out != "":
        target = Path(out) if out else Path(run_dir) / "privacy_canaries.json"
        if target.parent.is_dir():
            atomic_write_json(target, report)
    return report


def cli_canary(run: str, canaries: str, n_candidates: int = 1000, seed: int = 0) -> str:
    """`lmtailor privacy canary RUN --canaries FILE`: the table to print."""
    report = canary_report(run, canaries, n_candidates, seed)
    lines = [f"{'repeats':>7} {'rank':>6} {'exposure':>9} {'greedy':>6}  canary"]
    for r in report["canaries"]:
        lines.append(f"{r['repeats']:7} {r['rank']:6} {r['exposure']:6.2f}/{r['max_exposure']:<5.1f} "
                     f"{'yes' if r['greedy_reproduces'] else 'no':>6}  {r['prefix']}{r['secret']}")
    lines.append(f"{report['memorized']} of {len(report['canaries'])} canaries look memorized "
                 f"(greedy reproduces them, or exposure above half the maximum)")
    return "\n".join(lines)


def cli_plant(path: str, out: str, repeats: str = "0,1,10,100", pattern: str = "dddddd", seed: int = 0,
              force: bool = False) -> str:
    """`lmtailor privacy plant FILE --out OUT --repeats 0,1,10,100`: the text to print (`force`: replace existing
    outputs, keeping them as backups)."""
    import contextlib

    from lmtailor.outputs import check_output, replacing

    target = check_output(out, force, folder=False, inputs=(path,))
    targets = [target, check_output(target.with_name(f"{target.stem}.canaries.yaml"), force, folder=False,
                                    inputs=(path,))]
    try:
        counts = [int(r) for r in repeats.split(",")]
    except ValueError:
        counts = [-1]
    if not counts or min(counts) < 0:
        raise ConfigError(f"--repeats must be comma-separated counts, got {repeats!r}", "example: --repeats 0,1,10,100")
    with contextlib.ExitStack() as stack:
        for t in targets:
            stack.enter_context(replacing(t, force))
        listing = plant_canaries(path, out, make_canaries(counts, pattern, seed), seed)
    return f"wrote {out} with {sum(counts)} canary record(s); keep {listing} for `lmtailor privacy canary`"
