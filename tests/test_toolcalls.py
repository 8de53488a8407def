"""Tool calling: the documented parsing rule on valid, partial and malformed answers; tools in the chat data
format (validated, with field names in errors); rendering; a tiny model fine-tuned on calls emits a parseable one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lmtailor.toolcalls import parse_tool_calls

TOOLS = [{"type": "function", "function": {
    "name": "run_shell", "description": "Run one shell command and return its output",
    "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}}]


def _args(call: dict[str, Any]) -> dict[str, Any]:
    return json.loads(call["function"]["arguments"])


def test_valid_calls_are_parsed_and_removed_from_content() -> None:
    text = ('Let me look.\n<tool_call>\n{"name": "run_shell", "arguments": {"command": "ls -la"}}\n</tool_call>'
            '<tool_call>{"name": "run_shell", "arguments": "{\\"command\\": \\"pwd\\"}"}</tool_call>')
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "Let me look."
    assert [c["function"]["name"] for c in calls] == ["run_shell", "run_shell"]
    assert [_args(c) for c in calls] == [{"command": "ls -la"}, {"command": "pwd"}]
    assert calls[0]["type"] == "function" and calls[0]["id"] != calls[1]["id"]


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "run_shell", "arguments": {"command": "ls',  # cut off: never closed
    '<tool_call>\n{"name": "run_shell", "arguments": {"command": "ls"}\n',  # closing tag missing
    '<tool_call>{"name": "run_shell", "arguments": {"command": "ls"}</tool_call>',  # JSON not closed
    "<tool_call>run_shell(ls -la)</tool_call>",  # not JSON
    '<tool_call>{"name": "rm_everything", "arguments": {}}</tool_call>',  # not an offered tool
    '<tool_call>{"arguments": {"command": "ls"}}</tool_call>',  # no name
    '<tool_call>{"name": "run_shell", "arguments": ["ls"]}</tool_call>',  # arguments not an object
    "just text, no call",
])
def test_partial_and_malformed_calls_stay_content(text: str) -> None:
    content, calls = parse_tool_calls(text, TOOLS)
    assert calls == [] and content == text


def test_one_bad_block_beside_a_good_one() -> None:
    text = '<tool_call>oops</tool_call> then <tool_call>{"name": "run_shell", "arguments": {"command": "ls"}}' \
           "</tool_call>"
    content, calls = parse_tool_calls(text, TOOLS)
    assert len(calls) == 1 and content == "<tool_call>oops</tool_call> then"


def _write(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _record(**over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"tools": TOOLS, "messages": [
        {"role": "user", "content": "list files"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "run_shell", "arguments": {"command": "ls -la"}}}]},
        {"role": "tool", "content": "a.txt b.txt"},
        {"role": "assistant", "content": "There are two files."}]}
    rec.update(over)
    return rec


def test_chat_format_reads_tools_calls_and_tool_messages(tmp_path: Path) -> None:
    from lmtailor.data.validate import load_examples

    (ex,) = load_examples(str(_write(tmp_path, [_record()])))
    assert ex.tools and ex.tools[0]["function"]["name"] == "run_shell"
    assert [m["role"] for m in ex.messages or []] == ["user", "assistant", "tool", "assistant"]
    calls = json.loads((ex.messages or [])[1]["tool_calls"])
    assert calls[0]["function"]["arguments"] == {"command": "ls -la"}


@pytest.mark.parametrize("record,field", [
    (_record(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools[0].function.name"),
    (_record(tools="run_shell"), "tools"),
    (_record(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "other", "arguments": {}}}]}]), "messages[1].tool_calls[0].function.name"),
    (_record(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "run_shell", "arguments": "{not json"}}]}]),
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "out"},
                   {"role": "assistant", "content": "y"}]}, "messages[1].role"),
])
def test_bad_tool_records_name_their_field(tmp_path: Path, record: dict[str, Any], field: str) -> None:
    from lmtailor.data.validate import load_examples
    from lmtailor.errors import DataError

    with pytest.raises(DataError) as info:
        load_examples(str(_write(tmp_path, [record])))
    assert field in str(info.value) + "".join(getattr(info.value, "problems", []) or [])


def test_render_folds_tools_for_a_template_without_tool_support(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from lmtailor.data.formats import _chat
    from lmtailor.models import prepare_tokenizer
    from lmtailor.render import prompt_text, tokenize_example

    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model))
    ex = _chat(_record(), "x:1")
    (seq,) = tokenize_example(tok, ex, 512)
    text = tok.decode(seq.input_ids)
    assert "<tools>" in text and '{"name":"run_shell","description":' in text
    supervised = tok.decode([t for t, lab in zip(seq.input_ids, seq.labels, strict=True) if lab != -100])
    assert '<tool_call>\n{"name": "run_shell", "arguments": {"command":"ls -la"}}\n</tool_call>' in supervised
    assert "a.txt b.txt" not in supervised  # the tool's output is prompt, not a target
    prompt = prompt_text(tok, [{"role": "user", "content": "list files"}], ex.tools)
    assert prompt.startswith("<|im_start|>system\nYou can call these tools:")


def test_fine_tuned_tiny_model_emits_a_parseable_call(tiny_model: Path) -> None:
    """A few dozen full-model steps on three tool-call conversations, through the one renderer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmtailor.data.formats import _chat
    from lmtailor.models import prepare_tokenizer
    from lmtailor.render import prompt_ids, tokenize_example

    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    pairs = [("list files", "ls -la"), ("count lines", "wc -l f.txt"), ("show processes", "ps aux")]
    seqs = []
    for q, cmd in pairs:
        rec = {"tools": TOOLS, "messages": [{"role": "user", "content": q}, {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "run_shell", "arguments": {"command": cmd}}}]}]}
        seqs += tokenize_example(tok, _chat(rec, "x"), 512)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _step in range(200):
        for s in seqs:
            out = model(input_ids=torch.tensor([s.input_ids]), labels=torch.tensor([s.labels]))
            out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    ids = prompt_ids(tok, [{"role": "user", "content": "list files"}], TOOLS)
    with torch.inference_mode():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=120, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = tok.decode(gen[0, len(ids):], skip_special_tokens=True)
    content, calls = parse_tool_calls(text, TOOLS)
    assert calls, text
    assert calls[0]["function"]["name"] == "run_shell" and _args(calls[0]) == {"command": "ls -la"}


def test_tool_call_metrics_score_parse_name_and_arguments() -> None:
    from lmtailor.metrics import tool_call_metrics

    ref = [{"type": "function", "function": {"name": "run_shell", "arguments": {"command": "ls -la"}}}]
    preds = ['<tool_call>\n{"name": "run_shell", "arguments": {"command":"ls -la"}}\n</tool_call>',  # exact
             '<tool_call>{"name": "run_shell", "arguments": {"command": "ls -l"}}</tool_call>',  # near argument
             '<tool_call>{"name": "run_shell", "arguments": {"command": "ls',  # cut off: no call
             "ls -la"]  # plain text: no call
    m = tool_call_metrics(preds, [ref] * 4, [TOOLS] * 4)
    assert m["tool_call_parsed"] == 0.5 and m["tool_name_accuracy"] == 0.5 and m["tool_args_exact"] == 0.25
    assert 0 < m["tool_args_chrf"] < 100
    assert tool_call_metrics([], [], []) == {}



def test_nearest_answer_baseline_answers_with_the_nearest_training_call(tmp_path: Path) -> None:
    """The baseline is scored as the model is: a reference call as its <tool_call> text, and the nearest training
    call's tool-call scores (an empty assistant content once made the baseline 100% exact and chrF 0)."""
    from types import SimpleNamespace

    from lmtailor.data.validate import load_examples
    from lmtailor.objectives.causal import baseline

    def call(question: str, command: str) -> dict[str, Any]:
        answer = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "run_shell", "arguments": {"command": command}}}]}
        return {"tools": TOOLS, "messages": [{"role": "user", "content": question}, answer]}

    train = load_examples(str(_write(tmp_path, [call("list all files here", "ls -la"),
                                                call("show disk usage of a folder", "du -sh folder")])))
    (tmp_path / "held").mkdir()
    held = load_examples(str(_write(tmp_path / "held", [call("list the files", "ls -la"),
                                                        call("disk usage of this folder", "du -sh .")])))
    ctx = SimpleNamespace(cfg=SimpleNamespace(eval=SimpleNamespace(generate_examples=None)))
    out = baseline(ctx, train, held)["nearest_answer"]  # type: ignore[arg-type]
    assert out["exact_match"] == 0.5 and 0 < out["chrf"] < 100
    assert out["tool_call_parsed"] == 1.0 and out["tool_name_accuracy"] == 1.0 and out["tool_args_exact"] == 0.5
