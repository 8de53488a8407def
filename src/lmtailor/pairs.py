"""Preference data from a model's own answers (`lmtailor pairs make`) and scoring with a reward run
(`lmtailor score`).

`make_pairs` answers the prompts of SFT-style data with a run (batched, through generate's decoding and the
run's retrieval, if it trained with one) and writes preference records: the data's reference answer chosen and the
model's answer rejected (or the reverse). Answers equal to the reference teach nothing and are skipped, and so are
the examples the answering run held out (its validation and test splits), so that a run tuned on the pairs is
judged on questions neither run trained on.
"""

from __future__ import annotations

import json
from typing import Any

from lmtailor.config import GenerationSettings
from lmtailor.data.example import Example
from lmtailor.data.validate import content_key
from lmtailor.errors import DataError
from lmtailor.io import atomic_write_text
from lmtailor.outputs import check_output, existing, replacing
from lmtailor.render import prompt_messages


def _record(history: list[dict[str, str]], chosen: str, rejected: str) -> dict[str, Any]:
    head: dict[str, Any] = ({"prompt": history[0]["content"]} if len(history) == 1 else {"messages": history})
    return {**head, "chosen": chosen, "rejected": rejected}


def _chats(data: str, fmt: str, limit: int | None) -> list[Example]:
    from lmtailor.data.validate import clean_examples, load_examples

    examples, _ = clean_examples(load_examples(data, fmt))  # stripped, as a run's splits are
    chats = [ex for ex in examples if ex.messages is not None]
    if not chats:
        raise DataError(f"{data}: no conversations to answer", "give chat-shaped data (alpaca, chat, prompt/"
                        "completion, paired)")
    return chats[:limit] if limit else chats


def make_pairs(run: str, data: str, out: str, fmt: str = "auto", settings: GenerationSettings | None = None,
               reverse: bool = False, limit: int | None = None, speedup: str = "none", progress: bool = True,
               seed: int = 0, force: bool = False) -> dict[str, Any]:
    """Write preference pairs (JSONL) built from `data`'s prompts and `run`'s answers.

    Args:
        run: run folder, model folder or model name whose answers are the rejected ones.
        data: SFT-style data whose last assistant turn is the reference answer.
        out: the JSONL file to write (format: preference).
        fmt: data format of `data`.
        settings: decoding (default greedy, 64 new tokens, batches of 8).
        reverse: the model's answer chosen, the reference rejected.
        limit: answer at most this many examples.
        speedup: CPU decoding speed-up (see lmtailor.fastdecode.speed_up).
        seed: seeds sampling (temperature > 0), so the same call writes the same pairs.
        force: replace an existing `out` (kept as a backup, see lmtailor.outputs); without it, an error.

    Returns:
        {"pairs": written, "skipped_equal": answers equal to the reference, "skipped_empty": empty answers,
        "out": out}.
    """
    import torch

    from lmtailor.fastdecode import speed_up
    from lmtailor.generate import generate, retrieval_for
    from lmtailor.runs import Run

    target = check_output(out, force, folder=False, inputs=existing(run, data))  # before the minutes of decoding
    opened = Run.open(run)
    chats = _chats(data, fmt, None)
    held = _held_out(opened.config)
    kept = [ex for ex in chats if content_key(ex) not in held]
    skipped_held, chats = len(chats) - len(kept), kept[:limit] if limit else kept
    model, tok = opened.load()
    splits = [prompt_messages(ex) for ex in chats]
    prompts: list[Any] = [history for history, _ in splits]
    rag = retrieval_for(opened.config)
    if rag is not None:  # the run answers with its retrieved examples in the prompt, as it trained; a question
        # from its own training split is not shown its own answer (training never showed it: see data.retrieve)
        from lmtailor.data.retrieve import RunRetrieval

        own = isinstance(rag, RunRetrieval)
        for i, history in enumerate(prompts):
            if len(history) != 1:  # only a lone request is shown retrieved examples; a longer history goes as it is
                continue
            request = history[-1]["content"]
            prompts[i] = str(rag(request, training_request=True)) if own else str(rag(request))
    torch.manual_seed(seed)
    answers = generate(speed_up(model, speedup), tok, prompts, settings or GenerationSettings(), progress=progress,
                       desc="answering")
    lines, equal, empty = [], 0, 0
    for (history, reference), answer in zip(splits, answers, strict=True):
        if not answer.strip():  # the format needs two answers; an empty one is better taught by sft's EOS
            empty += 1
            continue
        if answer.strip() == reference.strip():
            equal += 1
            continue
        chosen, rejected = (answer, reference) if reverse else (reference, answer)
        lines.append(json.dumps(_record(history, chosen, rejected), ensure_ascii=False) + "\n")
    with replacing(target, force):
        atomic_write_text(target, "".join(lines))
    return {"pairs": len(lines), "skipped_equal": equal, "skipped_empty": empty, "skipped_held_out": skipped_held,
            "out": out}


def _held_out(config: dict[str, Any]) -> set[str]:
    """Content keys of the validation and test examples of the run that answers (empty for a plain model): pairs
    never hold the questions that run is judged on, so a run tuned on them can be compared with it fairly."""
    if not config:
        return set()
    from lmtailor.config import build_config
    from lmtailor.crypto import use_keys
    from lmtailor.data.validate import load_datasets, load_test_examples

    cfg = build_config(dict(config), "the run's config.yaml")
    with use_keys(cfg.privacy.key_source()):
        _, val, _ = load_datasets(cfg.data)
        test = load_test_examples(cfg.data)
    return {content_key(ex) for ex in [*val, *test]}


def score_data(run: str, data: str, fmt: str = "auto", out: str | None = None, force: bool = False
               ) -> dict[str, Any]:
    """Score every conversation of `data` with a reward run: preference records score chosen and rejected
    (and report the pairwise accuracy), others their last answer. With `out`, writes each record's scores as JSONL
    (an existing `out` is an error unless `force`, which keeps it as a backup).
    """
    target = check_output(out, force, folder=False, inputs=existing(run, data)) if out else None
    from lmtailor.data.validate import load_examples
    from lmtailor.objectives.reward import score

    examples = load_examples(data, fmt)
    convs: list[list[dict[str, str]]] = []
    for ex in examples:
        if ex.messages is None:
            raise DataError(f"{ex.source}: a reward run scores conversations, not raw text",
                            "give chat-shaped or preference data")
        convs.append(ex.messages)
        if "rejected" in ex.meta:
            history, _ = prompt_messages(ex)
            convs.append(history + ex.meta["rejected"])
    scores = score(run, convs)
    rows, wins, pairs, k = [], 0, 0, 0
    for ex in examples:
        if "rejected" in ex.meta:
            rows.append({"source": ex.source, "chosen_score": scores[k], "rejected_score": scores[k + 1]})
            wins, pairs, k = wins + (scores[k] > scores[k + 1]), pairs + 1, k + 2
        else:
            rows.append({"source": ex.source, "score": scores[k]})
            k += 1
    if target is not None:
        with replacing(target, force):
            atomic_write_text(target, "".join(json.dumps(r) + "\n" for r in rows))
    summary: dict[str, Any] = {"records": len(rows), "mean_score": sum(scores) / max(len(scores), 1)}
    if pairs:
        summary.update(pairs=pairs, accuracy=wins / pairs)
    return summary


def score_answers(run: str, prompt: str, answers: list[str], system: str | None = None) -> list[float]:
    """Rewards of answers to one prompt (rendered as a chat, with `system` first if given)."""
    from lmtailor.objectives.reward import score

    head = [{"role": "system", "content": system}] if system else []
    return score(run, [[*head, {"role": "user", "content": prompt}, {"role": "assistant", "content": a}]
                       for a in answers])
