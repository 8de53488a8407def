"""Knowledge base: chunking, BM25 and dense retrieval, fusion, storage and its embedder check, retrieval metrics,
RAFT training passages, term mining, and byte-identical retrieval prompts between training and serving."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from lmtailor.config import RetrievalSettings
from lmtailor.errors import ConfigError
from lmtailor.knowledge.base import KnowledgeBase, add_to_kb, build_kb, index_text
from lmtailor.knowledge.chunk import Document, chunk_document, word_offsets
from lmtailor.knowledge.fusion import rrf

DOC_MD = """# Archives

Archives bundle files.

## Extract

To extract a tar archive use tar -xzvf archive.tar.gz
and check the files.

## Create

one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen
"""

DOC_RST = """Networking
==========

Show open ports with ss -tulpn.

Firewall
--------

List firewall rules with iptables -L.
"""


def build_tiny_embedder(folder: Path, seed: int = 0) -> Path:
    """A 1-layer, 32-wide BERT with a word-piece vocabulary of the test texts, saved as a sentence-transformers
    folder (model.safetensors, tokenizer, mean pooling)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from conftest import CORPUS

    texts = [*CORPUS, DOC_MD, DOC_RST]
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(seed)
    # a wide initialisation keeps the word embeddings apart (at 0.02 every random text embeds near one direction)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, initializer_range=0.5)
    BertModel(cfg).save_pretrained(folder)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_embedder(tmp_path_factory.mktemp("emb"))


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "tar.md").write_text(DOC_MD)
    (folder / "net.rst").write_text(DOC_RST)
    return folder


def test_chunks_follow_headings_and_paragraphs_with_line_spans() -> None:
    chunks = chunk_document(Document(DOC_MD, "tar.md"), word_offsets, max_tokens=8, overlap=3)
    by_heading = {}
    for c in chunks:
        by_heading.setdefault(c.heading, []).append(c)
    assert set(by_heading) == {"Archives", "Archives > Extract", "Archives > Create"}
    extract = by_heading["Archives > Extract"]
    # a 13-word paragraph over two lines, windows of 8 words sharing 3: two windows, lines 7-8
    assert [c.n_tokens for c in extract] == [8, 8]
    assert extract[0].text.startswith("To extract") and extract[1].text.endswith("check the files.")
    assert (extract[0].start_line, extract[-1].end_line) == (7, 8)
    assert extract[0].text.split()[-3:] == extract[1].text.split()[:3]  # the overlap
    create = by_heading["Archives > Create"]
    assert all(c.start_line == c.end_line == 12 for c in create) and create[0].text.startswith("one two")
    assert by_heading["Archives"][0].lines == "3"

    rst = chunk_document(Document(DOC_RST, "net.rst"), word_offsets, max_tokens=50, overlap=5)
    assert [(c.heading, c.start_line) for c in rst] == [("Networking", 4), ("Networking > Firewall", 9)]
    # outside Markdown a `#` line is text (a shell comment in a cheat sheet), not a heading
    (sheet,) = chunk_document(Document("# extract an archive\ntar -xzvf a.tgz\n", "tar"), word_offsets, 50, 5)
    assert sheet.heading == "" and sheet.text.startswith("# extract") and (sheet.start_line, sheet.end_line) == (1, 2)


def test_paragraphs_under_one_heading_pack_and_identical_chunks_are_kept_once(docs: Path, tmp_path: Path) -> None:
    text = "# A\n\nfirst part.\n\nsecond part.\n"
    (chunk,) = chunk_document(Document(text, "a.md"), word_offsets, max_tokens=50, overlap=5)
    assert chunk.text == "first part.\n\nsecond part." and (chunk.start_line, chunk.end_line) == (3, 5)
    (docs / "copy.md").write_text(DOC_MD)  # the same text again: its chunks are dropped
    report = build_kb([str(docs)], tmp_path / "kb", embedder=None, max_tokens=50, overlap=5, progress=False)
    assert "duplicate chunks dropped" in report
    kb = KnowledgeBase.open(tmp_path / "kb")
    assert len({c.id for c in kb.chunks}) == len(kb.chunks) == kb.manifest["chunks"]
    assert kb.manifest["duplicates_dropped"] == 3


def test_bm25_ranks_a_planted_passage_first(tmp_path: Path) -> None:
    rng = random.Random(0)
    vocab = ["file", "folder", "disk", "copy", "move", "list", "show", "print", "count", "search", "text", "line",
             "word", "user", "group"]
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(30):
        (folder / f"filler{i}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(40)))
    (folder / "planted.txt").write_text("Filler first.\n\nThe frobnicator resets the flux capacitor.\n")
    build_kb([str(folder)], tmp_path / "kb", embedder=None, progress=False)
    kb = KnowledgeBase.open(tmp_path / "kb")
    (top, *_) = kb.search("how do I reset the flux capacitor", k=3, mode="bm25")
    assert top.chunk.source.endswith("planted.txt") and (top.chunk.start_line, top.chunk.end_line) == (1, 3)
    assert kb.manifest["bm25"]["library"] == "bm25s"
    assert kb.search("how do I reset the flux capacitor", k=3, mode="hybrid")[0].chunk == top.chunk  # BM25 only


def test_dense_retrieval_with_a_tiny_embedder(docs: Path, embedder: Path, tmp_path: Path) -> None:
    build_kb([str(docs)], tmp_path / "kb", embedder=str(embedder), max_tokens=60, overlap=10, progress=False)
    kb = KnowledgeBase.open(tmp_path / "kb")
    assert kb.vectors is not None and kb.vectors.shape == (len(kb.chunks), 32)
    assert np.allclose(np.linalg.norm(kb.vectors, axis=1), 1.0, atol=1e-5)
    for chunk in kb.chunks:  # a passage's own (indexed) text is its nearest neighbour (cosine 1)
        top = kb.search(index_text(chunk), k=1, mode="dense")[0]
        assert top.chunk == chunk and top.score == pytest.approx(1.0, abs=1e-4)
    manifest = json.loads((tmp_path / "kb" / "manifest.json").read_text())
    assert manifest["embedder"]["name"] == str(embedder.resolve()) and manifest["chunking"]["max_tokens"] == 60


def test_reciprocal_rank_fusion_order() -> None:
    # 2 is second in both lists and beats 1 and 3, each first in one list and absent from the other
    assert [d for d, _ in rrf([[1, 2, 4], [3, 2, 4]])] == [2, 4, 1, 3]
    fused = dict(rrf([[1, 2], [2, 1]]))
    assert fused[1] == pytest.approx(fused[2]) == pytest.approx(1 / 61 + 1 / 62)
    assert [d for d, _ in rrf([[5, 6], [6, 5]])] == [5, 6]  # a tie keeps the first ranking's order


def test_a_kb_refuses_an_embedder_that_does_not_match_its_manifest(docs: Path, embedder: Path,
                                                                    tmp_path: Path) -> None:
    build_kb([str(docs)], tmp_path / "kb", embedder=str(embedder), max_tokens=60, overlap=10, progress=False)
    other = build_tiny_embedder(tmp_path / "other", seed=1)
    with pytest.raises(ConfigError, match="was built with embedder"):
        KnowledgeBase.open(tmp_path / "kb", embedder=str(other))
    KnowledgeBase.open(tmp_path / "kb", embedder=str(embedder))  # the same one is fine
    # the embedder's weights changed under the base: refused when the dense index is first used
    build_tiny_embedder(embedder, seed=2)
    try:
        with pytest.raises(ConfigError, match="was built with embedder"):
            KnowledgeBase.open(tmp_path / "kb").search("open ports", mode="dense")
    finally:
        build_tiny_embedder(embedder, seed=0)
    with pytest.raises(ConfigError, match="not a knowledge base"):
        KnowledgeBase.open(tmp_path)


def test_adding_documents_embeds_only_the_new_chunks(docs: Path, embedder: Path, tmp_path: Path) -> None:
    (docs / "net.rst").unlink()
    build_kb([str(docs)], tmp_path / "kb", embedder=str(embedder), max_tokens=60, overlap=10, progress=False)
    before = KnowledgeBase.open(tmp_path / "kb")
    more = tmp_path / "more.rst"
    more.write_text(DOC_RST)
    add_to_kb(tmp_path / "kb", [str(more), str(docs)], progress=False)  # docs again: nothing new from it
    after = KnowledgeBase.open(tmp_path / "kb")
    n = len(before.chunks)
    assert after.chunks[:n] == before.chunks and len(after.chunks) == n + 2
    assert after.vectors is not None and before.vectors is not None
    assert np.array_equal(after.vectors[:n], before.vectors)
    assert after.search("firewall rules iptables", k=1, mode="bm25")[0].chunk.source == str(more)
    assert after.manifest["sources"] == [str(docs), str(more)]


def test_retrieval_metrics_on_labeled_queries(docs: Path, tmp_path: Path) -> None:
    from lmtailor.knowledge.metrics import evaluate_kb

    build_kb([str(docs)], tmp_path / "kb", embedder=None, progress=False)
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"query": "firewall rules", "contains": "iptables -L"}) + "\n"
                       + json.dumps({"query": "extract tar archive", "source": "tar.md", "line": 7}) + "\n"
                       + json.dumps({"query": "zebra", "contains": "never there"}) + "\n")
    result = evaluate_kb(tmp_path / "kb", queries, k=1)
    assert result["bm25"] == {"recall@1": pytest.approx(2 / 3), "mrr": pytest.approx(2 / 3), "queries": 3}
    assert "dense" not in result


def test_terms_mine_ranks_frequent_badly_split_terms(tiny_model: Path, tmp_path: Path) -> None:
    from lmtailor.knowledge.terms import mine_terms

    corpus = tmp_path / "c.txt"
    corpus.write_text("Restart it with kubectl rollout and kubectl apply. " * 5 + "the file and the folder. " * 20)
    report = mine_terms(str(corpus), tmp_path / "terms.txt", str(tiny_model), top=5, min_count=3)
    terms = (tmp_path / "terms.txt").read_text().split()
    assert terms[0] == "kubectl" and "file" not in terms and "terms written" in report


def _chat_data(path: Path) -> Path:
    from conftest import PAIRS

    rows = [{"instruction": f"how do I {q} {s}", "output": a} for s in ("now", "please") for q, a in PAIRS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sheet_kb(tmp_path: Path) -> Path:
    """A BM25-only base holding each PAIRS command on a sheet line of its own, among other lines."""
    from conftest import PAIRS

    sheets = tmp_path / "sheets"
    sheets.mkdir()
    for i, (q, a) in enumerate(PAIRS):
        (sheets / f"s{i}.md").write_text(f"# {q.split()[0]}\n\nTo {q}:\n{a}\n\nSee also the manual page.\n")
    build_kb([str(sheets)], tmp_path / "kb", embedder=None, progress=False)
    return tmp_path / "kb"


def test_raft_passages_hold_the_gold_passage_or_only_distractors(tmp_path: Path) -> None:
    from lmtailor.data.validate import load_examples
    from lmtailor.knowledge.raft import with_kb_passages

    kb = _sheet_kb(tmp_path)
    train = load_examples(str(_chat_data(tmp_path / "d.jsonl")))
    always, _, stats = with_kb_passages(train, [], RetrievalSettings(kb=str(kb), k=2, gold_absent=0.0), seed=1)
    assert stats["raft_gold_shown"] == len(train)
    assert all(ex.messages[-1]["content"] in ex.messages[-2]["content"] for ex in always)
    never, _, stats = with_kb_passages(train, [], RetrievalSettings(kb=str(kb), k=2, gold_absent=1.0), seed=1)
    assert stats["raft_gold_absent"] == len(train)
    assert all(ex.messages[-1]["content"] not in ex.messages[-2]["content"].split("Question:")[0] for ex in never)
    assert all(len(ex.meta["passages"]) == 2 for ex in never)  # distractors are still there


def test_training_and_serving_prompts_are_byte_identical_and_the_server_cites_sources(tiny_model: Path,
                                                                                     tmp_path: Path) -> None:
    import httpx

    from lmtailor.cli import main
    from lmtailor.data.validate import load_examples
    from lmtailor.knowledge.raft import with_kb_passages
    from lmtailor.render import prompt_ids, prompt_messages
    from lmtailor.runs import Run
    from lmtailor.serve import create_app, running

    kb = _sheet_kb(tmp_path)
    data = _chat_data(tmp_path / "d.jsonl")
    run = tmp_path / "run"
    assert main(["train", f"base_model={tiny_model}", f"data.path={data}", "data.val_size=4", "max_steps=2",
                 "batch_size=4", "eval.generate_examples=0", f"retrieval.kb={kb}", "retrieval.k=2",
                 f"output_dir={run}", "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"]["raft_gold_shown"] + metrics["data"]["raft_gold_absent"] == 16
    # the held-out prompt training built vs the prompt the server builds from the bare request
    cfg = Run.open(run).config
    settings = RetrievalSettings(**cfg["retrieval"])
    held = load_examples(str(data))[:3]
    _, (augmented,), _ = with_kb_passages([], [held], settings)
    _, tok = Run.open(run).load()
    app = create_app([str(run)])
    name = next(iter(app.state.slots))
    with running(app) as url:
        for ex, aug in zip(held, augmented, strict=True):
            request = ex.messages[-2]["content"]
            body = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": name, "messages": [{"role": "user", "content": request}], "max_tokens": 2}).json()
            trained = prompt_ids(tok, prompt_messages(aug)[0])
            assert body["usage"]["prompt_tokens"] == len(trained)
            served, cited = app.state.slots[name].retrieval.with_sources([{"role": "user", "content": request}])
            assert prompt_ids(tok, served) == trained
            assert body["sources"] == cited and cited[0]["source"].endswith(".md") and "lines" in cited[0]


def test_compare_puts_closed_and_open_book_side_by_side(tiny_model: Path, tmp_path: Path) -> None:
    import yaml

    from lmtailor.prompting.compare import compare, resolve_system
    from lmtailor.prompting.predict import PromptRunner
    from lmtailor.prompting.scoring import ScoreCache, Scorer
    from lmtailor.prompting.task import load_task
    from lmtailor.runs import Run

    kb = _sheet_kb(tmp_path)
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump({
        "name": "shell", "inputs": ["input"], "output": {"field": "output"}, "metric": "exact_match",
        "templates": ["{{ input }}"], "max_new_tokens": 4, "few_shot": {"k": 0},
        "data": {"path": str(_chat_data(tmp_path / "d.jsonl")), "val_size": 3}, "retrieval": {"kb": str(kb), "k": 1}}))
    task = load_task(path)
    closed, opened = resolve_system("zero-shot", task, str(tiny_model)), resolve_system("zero-shot+kb", task,
                                                                                        str(tiny_model))
    assert opened.name == "zero-shot+kb" and opened.spec.retrieval and not closed.spec.retrieval
    model, tok = Run.open(str(tiny_model)).load()
    runner = PromptRunner(task, Scorer(model, tok, "tiny", ScoreCache()), [])
    (msg,) = runner.open_book(opened.spec, [{"role": "user", "content": "how do I count lines"}])
    assert msg["content"].startswith("Passages from the documentation:\n\n[1] ") and "wc -l f.txt" in msg["content"]
    assert msg["content"].endswith("Question: how do I count lines")
    summary = compare(task, ["zero-shot", "zero-shot+kb"], str(tiny_model), limit=2, out=str(tmp_path / "cmp"),
                      cache=False, say=lambda *a: None)
    assert [r["system"] for r in summary["rows"]] == ["zero-shot", "zero-shot+kb"]
    assert "open book: 1 passages" in summary["rows"][1]["detail"]
