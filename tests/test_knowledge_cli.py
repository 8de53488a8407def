"""`lmtailor generate ... --kb` and `lmtailor chat ... --kb` through the real CLI: the passages' sources are printed,
and the prompt the model is fed is, token for token and byte for byte, the one training rendered for the same
held-out request (and the one the server renders)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from lmtailor.config import RetrievalSettings


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-step LoRA run trained with a BM25 knowledge base of sheets, its base, data and held-out prompts."""
    from lmtailor.cli import main
    from lmtailor.data.validate import load_examples
    from lmtailor.knowledge.raft import with_kb_passages
    from lmtailor.render import prompt_messages
    from lmtailor.runs import Run
    from test_knowledge import _chat_data, _sheet_kb

    tmp = tmp_path_factory.mktemp("kbcli")
    kb = _sheet_kb(tmp)
    data = _chat_data(tmp / "d.jsonl")
    run = tmp / "run"
    assert main(["train", f"base_model={tiny_model}", f"data.path={data}", "data.val_size=4", "max_steps=2",
                 "batch_size=4", "eval.generate_examples=0", "eval.before_after=false", f"retrieval.kb={kb}",
                 "retrieval.k=2", f"output_dir={run}", "--no-progress"]) == 0
    settings = RetrievalSettings(**Run.open(run).config["retrieval"])
    held = load_examples(str(data))[:3]
    _, (augmented,), _ = with_kb_passages([], [held], settings)  # what training renders for held-out requests
    return {"run": run, "kb": kb, "requests": [ex.messages[-2]["content"] for ex in held],
            "trained": [prompt_messages(ex)[0] for ex in augmented]}


class Fed:
    """Records the conversations the decoding code renders (the real `prompt_ids` still does the work)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import lmtailor.generate as gen

        self.messages: list[list[dict[str, str]]] = []
        real = gen.prompt_ids

        def spy(tok: Any, messages: list[dict[str, str]], *a: Any, **kw: Any) -> list[int]:
            self.messages.append([dict(m) for m in messages])
            return real(tok, messages, *a, **kw)

        monkeypatch.setattr(gen, "prompt_ids", spy)


def _same_prompt(tok: Any, fed: list[dict[str, str]], want: list[dict[str, str]]) -> None:
    from lmtailor.render import prompt_ids, prompt_text

    assert prompt_text(tok, fed).encode() == prompt_text(tok, want).encode()
    assert prompt_ids(tok, fed) == prompt_ids(tok, want)


def test_generate_with_kb_cites_sources_and_feeds_the_training_prompt(trained: dict[str, Any],
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from lmtailor.cli import main
    from lmtailor.runs import Run

    fed = Fed(monkeypatch)
    assert main(["generate", str(trained["run"]), *trained["requests"], "--kb", str(trained["kb"]),
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    cited = re.findall(r"^\[sources\] (.+)$", out, flags=re.M)
    assert len(cited) == 3
    for line in cited:  # "[1] /.../s0.md:3-6" (BM25 finds no other sheet sharing a word with the request)
        assert re.fullmatch(r"\[1\] \S+\.md:\d+(-\d+)?(; \[\d\] \S+\.md:\d+(-\d+)?)*", line), line
    _, tok = Run.open(str(trained["run"])).load()
    assert len(fed.messages) == 3
    for got, want in zip(fed.messages, trained["trained"], strict=True):
        _same_prompt(tok, got, want)
    # each request's own sheet comes first: "how do I list files now" -> s0.md ("ls -la")
    assert [re.match(r"\[1\] \S+/(s\d+)\.md", line).group(1) for line in cited] == ["s0", "s1", "s2"]  # type: ignore[union-attr]


def test_chat_with_kb_cites_sources_and_feeds_the_training_prompt(trained: dict[str, Any],
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from lmtailor.cli import main
    from lmtailor.runs import Run

    first, second = trained["requests"][:2]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{first}\n{second}\n\n"))
    fed = Fed(monkeypatch)
    assert main(["chat", str(trained["run"]), "--kb", str(trained["kb"]), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    cited = re.findall(r"^sources: (.+)$", out, flags=re.M)
    assert len(cited) == 2 and all(re.match(r"\[1\] \S+\.md:\d+", line) for line in cited)
    _, tok = Run.open(str(trained["run"])).load()
    assert len(fed.messages) == 2
    _same_prompt(tok, fed.messages[0], trained["trained"][0])  # turn 1: exactly the training prompt
    # turn 2: the history holds the user's own words and the reply; only the new request carries passages
    turn2 = fed.messages[1]
    assert turn2[0] == {"role": "user", "content": first} and turn2[1]["role"] == "assistant"
    assert turn2[2:] == [trained["trained"][1][-1]]


def test_generate_with_kb_on_a_plain_model_matches_the_server(tiny_model: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A model that never trained with retrieval, given --kb: the default retrieval settings, as `serve --kb`."""
    from lmtailor.cli import main
    from lmtailor.render import prompt_ids
    from lmtailor.serve import create_app
    from test_knowledge import _sheet_kb

    kb = _sheet_kb(tmp_path)
    fed = Fed(monkeypatch)
    assert main(["generate", str(tiny_model), "how do I count lines", "--kb", str(kb), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\[sources\] \[1\] \S+/s3\.md:3-6$", out, flags=re.M), out  # the sheet of "count lines"
    (got,) = fed.messages
    assert got[-1]["content"].startswith("Passages from the documentation:\n\n[1] ")
    assert got[-1]["content"].endswith("\n\nQuestion: how do I count lines") and "wc -l f.txt" in got[-1]["content"]
    app = create_app([str(tiny_model)], kb=str(kb))
    slot = next(iter(app.state.slots.values()))
    served, cited = slot.retrieval.with_sources([{"role": "user", "content": "how do I count lines"}])
    assert prompt_ids(slot.tok, served) == prompt_ids(slot.tok, got)
    assert f"[1] {cited[0]['source']}:{cited[0]['lines']}" in out
    assert json.dumps(served) == json.dumps(got)
