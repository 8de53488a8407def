"""data.retrieved_examples: each request sees its most similar training examples, never itself; baselines see the
data as it was."""

from __future__ import annotations

import json

import pytest

from lmtailor.cli import main
from lmtailor.data.example import Example
from lmtailor.data.retrieve import INTRO, query, with_retrieved
from lmtailor.errors import ConfigError


def _chat(q: str, a: str, source: str = "") -> Example:
    return Example(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}], source=source)


TRAIN = [_chat("extract a tar archive", "tar -xf a.tar"), _chat("list hidden files", "ls -a"),
         _chat("count lines in a file", "wc -l f"), _chat("extract a zip archive", "unzip a.zip")]


def test_a_shown_answer_that_calls_a_tool_is_shown_as_its_call():
    call = json.dumps([{"type": "function", "function": {"name": "run_shell", "arguments": {"command": "ls -a"}}}])
    tool_chat = Example(messages=[{"role": "user", "content": "list hidden files"},
                                  {"role": "assistant", "content": "", "tool_calls": call}])
    _, (test,) = with_retrieved([tool_chat], [[_chat("list the hidden files here", "ls -A")]], k=1)
    prompt = test[0].messages[0]["content"]
    assert 'Answer: <tool_call>\n{"name": "run_shell", "arguments": {"command":"ls -a"}}\n</tool_call>' in prompt
    assert test[0].meta["nearest"][0] == "list hidden files"


def test_nearest_examples_come_last_and_a_training_example_never_sees_itself():
    train, (test,) = with_retrieved(TRAIN, [[_chat("how to extract a gzip tar archive", "tar -xzf a.tgz")]], k=2)
    prompt = test[0].messages[0]["content"]
    assert prompt.startswith(INTRO) and prompt.endswith("how to extract a gzip tar archive")
    # the two archive examples, the best match (tar) nearest to the request
    assert prompt.index("unzip a.zip") < prompt.index("tar -xf a.tar") < prompt.index("how to extract a gzip")
    assert "ls -a" not in prompt and "wc -l" not in prompt
    assert test[0].messages[1]["content"] == "tar -xzf a.tgz"  # the answer is untouched
    assert query(test[0]) == "how to extract a gzip tar archive"
    for original, shown in zip(TRAIN, train, strict=True):
        own_answer = original.messages[1]["content"]
        assert f"Answer: {own_answer}" not in shown.messages[0]["content"]
        assert query(shown) == original.messages[0]["content"] and shown.messages[1]["content"] == own_answer
    assert "unzip a.zip" in train[0].messages[0]["content"]  # the tar example's nearest other one


def test_text_or_labeled_records_are_refused_with_the_key_to_change():
    labeled = Example(text="great match", source="news.jsonl:3", meta={"label": "sport"})
    with pytest.raises(ConfigError, match=r"news.jsonl:3: data.retrieved_examples needs chat-shaped"):
        with_retrieved([labeled], [], k=2)


def test_a_run_with_retrieval_trains_and_keeps_the_baselines_of_the_plain_data(tiny_model, tmp_path):
    from conftest import PAIRS

    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"{q} {suffix}", "output": a} for suffix in ("now", "please") for q, a in PAIRS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"base_model={tiny_model}", f"data.path={data}", "data.val_size=4", "max_steps=3", "batch_size=4",
              "eval.generate_examples=4", "generation.max_new_tokens=4", "--no-progress"]
    plain, rag = tmp_path / "plain", tmp_path / "rag"
    assert main(["train", *common, f"output_dir={plain}"]) == 0
    assert main(["train", *common, f"output_dir={rag}", "data.retrieved_examples=2"]) == 0
    m_plain, m_rag = (json.loads((r / "metrics.json").read_text()) for r in (plain, rag))
    assert m_rag["baselines"] == m_plain["baselines"] and "nearest_answer" in m_rag["baselines"]
    # the prompts grew by the retrieved pairs: more tokens per training example
    assert m_rag["data"]["train_tokens"] > 2 * m_plain["data"]["train_tokens"]
    # generate, chat and serve show new prompts the same retrieved examples, from the run's own training split
    from lmtailor.generate import answer, retrieval_for
    from lmtailor.runs import Run

    rag_prompt = retrieval_for(Run.open(rag).config)
    assert retrieval_for(Run.open(plain).config) is None and rag_prompt is not None
    shown = rag_prompt("list files please")
    assert shown.startswith(INTRO) and "Answer: ls -la" in shown and shown.endswith("list files please")
    chat = rag_prompt([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                       {"role": "user", "content": "extract archive now"}])
    assert chat[0]["content"] == "hi" and "Answer: tar -xzvf a.tar.gz" in chat[2]["content"]
    from lmtailor.config import GenerationSettings

    assert len(answer(str(rag), ["list files please"], GenerationSettings(max_new_tokens=3))) == 1
    # `lmtailor eval` on new data shows each request its nearest training pairs too (as the after evaluation did)
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"instruction": "list files today", "output": "ls -la"}) + "\n")
    from lmtailor.evaluate import evaluate_run

    for run, shown_pairs in ((rag, True), (plain, False)):
        sample = evaluate_run(str(run), str(held), n_generate=1)["samples"][0]
        assert sample["prompt"].startswith(INTRO) is shown_pairs
        assert ("Answer: ls -la" in sample["prompt"]) is shown_pairs and sample["prompt"].endswith("list files today")
    # the server's slot for the run carries the same retrieval; the base model's slot has none
    from lmtailor.serve.models import load_models

    slots = load_models([str(rag)])
    tuned = [s for s in slots.values() if s.adapter]
    assert len(tuned) == 1 and tuned[0].retrieval is not None
    assert all(s.retrieval is None for s in slots.values() if not s.adapter)
    assert "Answer: ls -la" in tuned[0].retrieval([{"role": "user", "content": "list files please"}])[0]["content"]


def test_a_training_request_asked_again_is_not_shown_its_own_answer():
    from lmtailor.data.retrieve import Retriever, RunRetrieval

    rag = RunRetrieval(Retriever(TRAIN), k=1)
    # a new request sees its nearest training pair; `pairs make` answering the training data itself must not see
    # the request's own pair (the model would copy the reference and the "rejected" answer would be the chosen one)
    assert "Answer: tar -xf a.tar" in rag("extract a tar archive")
    shown = rag("extract  a tar archive", training_request=True)
    assert "tar -xf a.tar" not in shown and "Answer: unzip a.zip" in shown
    chat = rag([{"role": "user", "content": "list hidden files"}], training_request=True)
    assert "ls -a" not in chat[0]["content"] and chat[0]["content"].startswith(INTRO)


def _topic_rows(n_per_topic: int, answers_carry: bool) -> list[dict[str, str]]:
    """Requests that share a topic word; their answers share the topic's command, or are unrelated strings."""
    import random

    rng = random.Random(3)
    tools = {"archive": "tar -xzf", "files": "ls -la", "lines": "wc -l", "space": "du -sh", "text": "grep -rn"}
    return [{"instruction": f"show the {topic} of entry {topic[:2]}{i}",
             "output": f"{cmd} {topic[:2]}{i}" if answers_carry else "".join(rng.choice("qxzjvk") for _ in range(12))}
            for i in range(n_per_topic) for topic, cmd in tools.items()]


def test_a_recipe_that_leaves_retrieval_unset_gets_it_from_the_data(tiny_model, tmp_path, capsys):
    """Unset on chat data, data.retrieved_examples is chosen by auto's rule, printed with its reason, written to the
    run's config.yaml and used by generate; a recipe that sets it keeps its value."""
    import yaml

    from lmtailor.generate import retrieval_for
    from lmtailor.runs import Run

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _topic_rows(8, answers_carry=True)))
    common = [f"base_model={tiny_model}", f"data.path={data}", "data.val_size=4", "max_steps=1", "batch_size=4",
              "eval.before_after=false", "eval.generate_examples=0", "--no-progress"]
    assert main(["train", *common, f"output_dir={tmp_path / 'fitted'}"]) == 0
    out = capsys.readouterr().out
    assert "data.retrieved_examples=1 (on " in out and "similar requests carry their answers" in out
    config = yaml.safe_load((tmp_path / "fitted" / "config.yaml").read_text())
    assert config["data"]["retrieved_examples"] == 1
    shown = retrieval_for(Run.open(tmp_path / "fitted").config)("show the files of entry fi3")
    assert shown.startswith(INTRO) and "Answer: ls -la fi" in shown
    assert main(["train", *common, f"output_dir={tmp_path / 'set'}", "data.retrieved_examples=0"]) == 0
    assert "data.retrieved_examples" not in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())["data"]["retrieved_examples"] == 0
    assert retrieval_for(Run.open(tmp_path / "set").config) is None


def test_retrieval_stays_off_where_neighbours_do_not_carry_the_answer_or_it_does_not_apply(tiny_model, tmp_path):
    from lmtailor.config import build_config
    from lmtailor.fitting import choose_retrieved_examples
    from lmtailor.objectives import get_objective

    def choose(records: list[dict[str, str]], data_keys: dict | None = None, **recipe: object) -> object:
        data = tmp_path / "r.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        cfg = build_config({"base_model": str(tiny_model), "data": {"path": str(data), **(data_keys or {})},
                            **recipe}, "test")
        from lmtailor.data.validate import load_datasets

        train, val, _ = load_datasets(cfg.data)
        return choose_retrieved_examples(cfg, get_objective(cfg), train, [val])

    unrelated = choose(_topic_rows(8, answers_carry=False))
    assert unrelated is not None and unrelated.value == 0 and "do not carry their answers" in unrelated.reason
    carried = choose(_topic_rows(8, answers_carry=True))
    assert carried is not None and carried.value == 1
    assert choose(_topic_rows(8, answers_carry=True), data_keys={"retrieved_examples": 2}) is None
    labeled = [{"text": f"text {i}", "label": "a" if i % 2 else "b"} for i in range(40)]
    assert choose(labeled, objective="classify") is None
