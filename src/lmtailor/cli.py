"""Command line: each verb parses its arguments, calls one library function and prints the result."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

from lmtailor.errors import DataError, LmtailorError

EPILOG = """recipes: YAML files (see configs/); override any key with key=value,
  e.g. lr=1e-4 lora.r=16 data.path=my.jsonl
examples:
  lmtailor train configs/quickstart.yaml
  lmtailor eval runs/quickstart --data test.jsonl
  lmtailor generate runs/quickstart "How do I list open ports?" --compare
  lmtailor chat runs/quickstart
  lmtailor validate my.yaml
  lmtailor tune configs/classify-spam.yaml --trials 20 --timeout 2h
  lmtailor datasets list
  lmtailor serve runs/quickstart --port 8000          # OpenAI-compatible API + playground at /
  lmtailor export runs/quickstart --format gguf --out m.gguf
  lmtailor kb build docs/ --out kb/ && lmtailor kb search kb/ "extract a tar.gz archive"
  lmtailor pairs make runs/quickstart --data catalog:shell-commands --out pairs.jsonl
  lmtailor score runs/reward-shell --data pairs.jsonl
"""


def _gen_args(p: argparse.ArgumentParser) -> None:
    from lmtailor.config import SPEEDUP_HELP, SPEEDUPS

    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-repeats", type=int, default=3, help="end an answer once it ends in this many copies of "
                   "one n-gram (12+ tokens), keeping the first copy; 0: off")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--speedup", default="none", metavar="{" + ",".join(SPEEDUPS) + "}", help=SPEEDUP_HELP)


def _gen_settings(a: argparse.Namespace):  # type: ignore[no-untyped-def]
    from pydantic import ValidationError

    from lmtailor.config import GenerationSettings, check_speedup, explain_flags

    check_speedup(a.speedup)  # before any model loads
    try:
        return GenerationSettings(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                                  top_p=a.top_p, repetition_penalty=a.repetition_penalty, stop=a.stop,
                                  stop_repeats=a.stop_repeats)
    except ValidationError as e:  # e.g. --temperature -1: one line naming the option's setting
        raise explain_flags(e) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmtailor", description="Tailor language models to your data.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="verb", required=True)
    # Called in this order so `lmtailor --help` lists the verbs as it always has.
    _train_verbs(sub)
    _generate_verbs(sub)
    _data_verbs(sub)
    _deploy_verbs(sub)
    _prompt_verbs(sub)
    _privacy_verbs(sub)
    _knowledge_verbs(sub)
    _preference_verbs(sub)
    return p


def _train_verbs(sub: argparse._SubParsersAction) -> None:
    """train, tune, auto, validate, eval."""
    t = sub.add_parser("train", help="train a recipe")
    t.add_argument("recipe", nargs="?", help="YAML recipe (defaults if omitted)")
    t.add_argument("overrides", nargs="*", help="key=value overrides")
    t.add_argument("--no-progress", action="store_true")

    tn = sub.add_parser("tune", help="search hyperparameters of a recipe with Optuna (resumable SQLite study)")
    tn.add_argument("recipe", help="YAML recipe; its `tune:` section is the search space")
    tn.add_argument("overrides", nargs="*", help="key=value overrides")
    tn.add_argument("--trials", type=int, default=20, help="total finished trials the study should reach")
    tn.add_argument("--timeout", default=None, help="stop starting trials after this long (90s, 30m, 2h)")
    tn.add_argument("--param", action="append", default=[],
                    help="search-space entry, e.g. 'lr=[1e-5,1e-3,log]' or 'lora.r=[4,8,16]' (repeatable)")
    tn.add_argument("--no-prune", action="store_true", help="run every trial to the end")
    tn.add_argument("--progress", action="store_true", help="show each trial's progress bars")

    au = sub.add_parser("auto", help="pick objective and settings for a data file within a time budget, train the "
                        "best, report it against the baselines")
    au.add_argument("data", help="data file/folder/catalog:NAME (format detected)")
    au.add_argument("--budget", required=True, help="wall-clock time for the whole job (90s, 20m, 2h)")
    au.add_argument("--out", default=None, help="output folder (default runs/auto-<data name>)")
    au.add_argument("--base-model", default="smollm2-135m-instruct", help="model to tailor")
    au.add_argument("--format", default="auto")
    au.add_argument("--trials", type=int, default=6, help="candidates the search may start")
    au.add_argument("--progress", action="store_true", help="show each run's progress bars")
    _force_arg(au)

    v = sub.add_parser("validate", help="check a recipe and its data without training")
    v.add_argument("recipe", nargs="?", help="YAML recipe (defaults if omitted)")
    v.add_argument("overrides", nargs="*", help="key=value overrides")

    pl = sub.add_parser("plan", help="memory and speed of fine-tuning a model on given GPUs, per method")
    pl.add_argument("model", help="hub id (a few families are built in, offline), model folder or bundled name")
    pl.add_argument("--gpus", default="1x24GB", help="COUNTxGPU: 1x24GB, 8xH100, 2xA100-80GB (default 1x24GB)")
    pl.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (packed row)")
    pl.add_argument("--utilisation", type=float, default=0.4, help="share of the GPU's peak FLOP/s assumed")
    pl.add_argument("--lora-r", type=int, default=16)
    pl.add_argument("--optimizer", choices=("adamw", "adamw_8bit"), default="adamw")
    pl.add_argument("--json", action="store_true", help="print JSON")

    e = sub.add_parser("eval", help="evaluate a run or model on a data file")
    e.add_argument("run", help="run folder, model folder or model name")
    e.add_argument("--data", required=True, help="data file/folder/catalog:NAME")
    e.add_argument("--format", default="auto")
    e.add_argument("--generate", type=int, default=40, help="examples answered by generation and scored "
                   "(exact match, chrF; BLEU and ROUGE for seq2seq; 0: loss only)")
    e.add_argument("--max-length", type=int, default=None, help="truncation (default: the run's, else 512)")
    e.add_argument("--out", default=None, help="write the metrics JSON here")
    _force_arg(e)
    e.add_argument("--metric", choices=["default", "perplexity"], default="default",
                   help="perplexity: sliding-window perplexity of raw text (pseudo-perplexity for masked LMs)")
    e.add_argument("--context", type=int, default=None, help="perplexity window in tokens (default --max-length)")
    e.add_argument("--stride", type=int, default=None, help="tokens the window advances (default context / 2)")
    e.add_argument("--kb", default=None, help="open book: passages of this knowledge base in every prompt")


def _generate_verbs(sub: argparse._SubParsersAction) -> None:
    """generate, chat."""
    g = sub.add_parser("generate", help="answer prompts with a run or model")
    g.add_argument("run")
    g.add_argument("prompts", nargs="+")
    g.add_argument("--compare", action="store_true", help="also answer with the base model, side by side")
    g.add_argument("--raw", action="store_true", help="continue the prompt as plain text (no chat template)")
    g.add_argument("--kb", default=None, help="knowledge base whose passages go into each prompt (sources cited)")
    _gen_args(g)

    c = sub.add_parser("chat", help="interactive chat with a run or model")
    c.add_argument("run")
    c.add_argument("--kb", default=None, help="knowledge base whose passages go into each prompt (sources cited)")
    _gen_args(c)


def _data_verbs(sub: argparse._SubParsersAction) -> None:
    """tokenizer train|extend, datasets list|fetch."""
    tk = sub.add_parser("tokenizer", help="train a tokenizer, or extend a model's vocabulary with domain terms")
    tsub = tk.add_subparsers(dest="action", required=True)
    tt = tsub.add_parser("train", help="train a BPE or Unigram tokenizer on a corpus")
    tt.add_argument("--corpus", required=True, help="folder of .txt/.md/.rst files, a text file, or catalog:NAME")
    tt.add_argument("--vocab-size", type=int, default=8000)
    tt.add_argument("--out", required=True, help="tokenizer folder to write")
    tt.add_argument("--type", choices=["bpe", "unigram"], default="bpe")
    _force_arg(tt)
    te = tsub.add_parser("extend", help="add terms to a model's tokenizer; new embeddings = mean of sub-tokens")
    te.add_argument("base", help="model name or folder")
    te.add_argument("--terms", required=True, help="text file, one term per line")
    te.add_argument("--out", required=True, help="model folder to write (model + tokenizer)")
    te.add_argument("--corpus", default=None, help="report this corpus's token count before and after")
    _force_arg(te)

    d = sub.add_parser("datasets", help="the built-in dataset catalog")
    dsub = d.add_subparsers(dest="action", required=True)
    dsub.add_parser("list", help="list catalog datasets")
    f = dsub.add_parser("fetch", help="download a catalog dataset into the cache")
    f.add_argument("name")
    f.add_argument("--refresh", action="store_true")


def _deploy_verbs(sub: argparse._SubParsersAction) -> None:
    """serve, export."""
    from lmtailor.config import SPEEDUP_HELP, SPEEDUPS

    s = sub.add_parser("serve", help="OpenAI-compatible API and web playground for runs or models")
    s.add_argument("runs", nargs="+", help="run folders, model folders or model names (each becomes a model id)")
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="environment variable holding the bearer key clients must send")
    # No argparse choices: check_speedup refuses in one line, and says where int8 went (llama.cpp).
    s.add_argument("--speedup", default="none", metavar="{" + ",".join(SPEEDUPS) + "}", help=SPEEDUP_HELP)
    s.add_argument("--threads", type=int, default=0, help="torch threads for decoding (0: torch default; "
                   "1 is as fast and far steadier on a shared machine)")
    s.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    s.add_argument("--timeout", type=float, default=300.0, help="seconds per request, queueing included")
    s.add_argument("--kb", default=None, help="knowledge base every model retrieves passages from; chat responses "
                   "carry them in an extra `sources` field")
    s.add_argument("--engine", choices=["torch", "llama.cpp", "vllm"], default=None,
                   help="decoding engine: torch (batched transformers), llama.cpp (the run exported to GGUF once, "
                        "cached), vllm (NVIDIA GPU only); default: the one measured faster on CPU (see README)")
    s.add_argument("--gguf-type", choices=["f16", "q8_0", "q4_k_m"], default="q8_0",
                   help="llama.cpp engine: GGUF type the run is exported to")

    x = sub.add_parser("export", help="merge a LoRA run into a plain HF folder, or write one GGUF file")
    x.add_argument("run", help="run folder, model folder or model name")
    x.add_argument("--format", choices=["merged", "gguf"], required=True)
    x.add_argument("--out", required=True, help="folder (merged) or .gguf file")
    x.add_argument("--gguf-type", choices=["f16", "q8_0", "q4_k_m"], default="f16",
                   help="q4_k_m: made by llama.cpp's own quantizer (needs llama-cpp-python)")
    x.add_argument("--ollama", action="store_true", help="GGUF: also write an Ollama Modelfile beside the file")
    _force_arg(x)


def _preference_verbs(sub: argparse._SubParsersAction) -> None:
    """pairs make, score."""
    pr = sub.add_parser("pairs", help="preference data from a model's own answers")
    prsub = pr.add_subparsers(dest="action", required=True)
    pm = prsub.add_parser("make", help="reference answer chosen, the model's own answer rejected (JSONL)")
    pm.add_argument("run", help="run folder, model folder or model name that answers")
    pm.add_argument("--data", required=True, help="SFT-style data file/folder/catalog:NAME")
    pm.add_argument("--out", required=True, help="JSONL file of preference records to write")
    pm.add_argument("--format", default="auto")
    pm.add_argument("--reverse", action="store_true", help="the model's answer chosen, the reference rejected")
    pm.add_argument("--limit", type=int, default=None, help="answer at most this many examples")
    pm.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    pm.add_argument("--seed", type=int, default=0, help="seed of sampling (with --temperature above 0)")
    pm.add_argument("--no-progress", action="store_true")
    _force_arg(pm)
    _gen_args(pm)

    sc = sub.add_parser("score", help="score answers or a data file with a reward run")
    sc.add_argument("run", help="reward run folder (objective: reward)")
    sc.add_argument("--answer", action="append", default=[], dest="answers", help="an answer to --prompt "
                    "(repeatable)")
    sc.add_argument("--prompt", default=None, help="the request the answers reply to")
    sc.add_argument("--system", default=None, help="system message")
    sc.add_argument("--data", default=None, help="score every record of this data file instead")
    sc.add_argument("--format", default="auto")
    sc.add_argument("--out", default=None, help="with --data: write each record's scores here (JSONL)")
    _force_arg(sc)


def _pairs(a: argparse.Namespace) -> None:
    from lmtailor.pairs import make_pairs

    settings = _gen_settings(a).model_copy(update={"batch_size": a.batch_size})
    print(json.dumps(make_pairs(a.run, a.data, a.out, a.format, settings, a.reverse, a.limit, a.speedup,
                                progress=not a.no_progress, seed=a.seed, force=a.force), indent=2))


def _score(a: argparse.Namespace) -> None:
    from lmtailor.errors import ConfigError
    from lmtailor.pairs import score_answers, score_data

    if a.data:
        print(json.dumps(score_data(a.run, a.data, a.format, a.out, force=a.force), indent=2))
    elif a.prompt is not None and a.answers:
        for text, value in zip(a.answers, score_answers(a.run, a.prompt, a.answers, a.system), strict=True):
            print(f"{value:.4f}\t{text}")
    else:
        raise ConfigError("score needs --data FILE, or --prompt TEXT and --answer TEXT",
                          "e.g. lmtailor score runs/reward --prompt 'list files' --answer 'ls -la' --answer 'rm -rf /'")


def _prompt_verbs(sub: argparse._SubParsersAction) -> None:
    """prompt run|optimize, compare."""
    pm = sub.add_parser("prompt", help="prompt engineering on a task file: score a prompt, or search for a better one")
    pmsub = pm.add_subparsers(dest="action", required=True)
    pmr = pmsub.add_parser("run", help="score the task's prompt on test data with the task's metric")
    pmr.add_argument("task", help="task YAML (inputs, output labels/field, templates, metric, few_shot)")
    pmr.add_argument("overrides", nargs="*", help="key=value overrides of the task file (e.g. few_shot.k=0)")
    pmr.add_argument("--model", default="smollm2-135m-instruct", help="model name/folder or run folder")
    pmr.add_argument("--data", default=None, help="test data (default: the held-out split of the task's data)")
    pmr.add_argument("--pool", default=None, help="few-shot example pool (default: the task data's training split)")
    pmr.add_argument("--template", type=int, default=0, help="which of the task's templates")
    pmr.add_argument("--zero-shot", action="store_true", help="no few-shot examples")
    pmr.add_argument("--limit", type=int, default=None, help="score only the first N test examples")
    pmr.add_argument("--out", default=None, help="folder for metrics.json and predictions.jsonl")
    pmr.add_argument("--no-cache", action="store_true", help="do not read or write the score cache")
    _force_arg(pmr)
    pmo = pmsub.add_parser("optimize", help="search instructions, examples, shots and order on a dev set")
    pmo.add_argument("task")
    pmo.add_argument("overrides", nargs="*", help="key=value overrides of the task file (e.g. search.shots=[0,4])")
    pmo.add_argument("--model", default="smollm2-135m-instruct")
    pmo.add_argument("--dev", default=None, help="dev data (default: task.dev_size examples of the training split)")
    pmo.add_argument("--pool", default=None, help="few-shot example pool (default: the rest of the training split)")
    pmo.add_argument("--budget", type=int, default=None, help="model calls (default search.budget)")
    pmo.add_argument("--out", default=None, help="output folder (default runs/<task>-prompt-search)")
    pmo.add_argument("--no-cache", action="store_true")
    _force_arg(pmo)

    cp = sub.add_parser("compare", help="zero-shot vs few-shot vs optimized prompt vs fine-tuned runs, one test set")
    cp.add_argument("task", help="task YAML")
    cp.add_argument("systems", nargs="+", help="zero-shot, few-shot, optimized, a task .yaml, a run folder; "
                                               "NAME=SYSTEM to rename")
    cp.add_argument("--model", default="smollm2-135m-instruct", help="base model of the prompt systems")
    cp.add_argument("--test", default=None, help="test data (default: the held-out split of the task's data)")
    cp.add_argument("--pool", default=None, help="few-shot example pool (default: the task data's training split)")
    cp.add_argument("--limit", type=int, default=None, help="use only the first N test examples")
    cp.add_argument("--out", default=None, help="report folder (default runs/<task>-compare)")
    cp.add_argument("--no-cache", action="store_true")
    _force_arg(cp)


def _scan_option_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phone-region", default="US", help="region(s) whose national phone formats count, e.g. DE "
                   "or DE,FR (numbers written with +country are found anyway)")
    p.add_argument("--no-documentation-emails", dest="documentation_emails", action="store_false",
                   help="do not count addresses at documentation domains (example.com, .test, ...) as PII")


def _privacy_verbs(sub: argparse._SubParsersAction) -> None:
    """privacy scan|scrub|plant|canary|encrypt|decrypt|keygen."""
    pv = sub.add_parser("privacy", help="find and scrub personal data; check a run for memorized canaries")
    psub = pv.add_subparsers(dest="action", required=True)
    ps = psub.add_parser("scan", help="count PII by type, field and line; changes nothing")
    ps.add_argument("file")
    ps.add_argument("--json", action="store_true", help="print the full report as JSON")
    ps.add_argument("--ner", action="store_true", help="also find names and places (needs an NER backend)")
    _scan_option_args(ps)
    pr = psub.add_parser("scrub", help="write a copy with PII replaced, and an audit JSON beside it")
    pr.add_argument("file")
    pr.add_argument("--out", required=True, help="output file; its suffix picks the format (.jsonl, .json, .csv)")
    pr.add_argument("--mode", choices=["placeholder", "pseudonym"], default="placeholder")
    pr.add_argument("--salt-env", default="LMTAILOR_PRIVACY_SALT",
                    help="environment variable holding the pseudonym key (unset: a random key, not stored)")
    pr.add_argument("--audit", default=None, help="audit JSON path (default OUT.audit.json)")
    pr.add_argument("--ner", action="store_true", help="also scrub names and places (needs an NER backend)")
    _force_arg(pr)
    _scan_option_args(pr)
    pp = psub.add_parser("plant", help="add canary records to a data file, for a memorization check")
    pp.add_argument("file")
    pp.add_argument("--out", required=True)
    pp.add_argument("--repeats", default="0,1,10,100", help="copies of each canary, comma-separated (0: control)")
    pp.add_argument("--pattern", default="dddddd", help="secret shape: d digit, x hex, a/A letter")
    pp.add_argument("--seed", type=int, default=0)
    _force_arg(pp)
    pc = psub.add_parser("canary", help="measure how exposed planted canaries are in a trained run")
    pc.add_argument("run")
    pc.add_argument("--canaries", required=True, help="the .canaries.yaml file `privacy plant` wrote")
    pc.add_argument("--candidates", type=int, default=1000, help="random secrets each canary is ranked against")
    for verb, what in (("encrypt", "encrypt a file, or a folder into one file (AES-256-GCM, chunked)"),
                       ("decrypt", "decrypt a file `privacy encrypt` wrote (a sealed folder becomes a folder)")):
        pe = psub.add_parser(verb, help=what)
        pe.add_argument("path")
        pe.add_argument("--out", required=True, help="output path; on a wrong key or a damaged byte nothing is written")
        _force_arg(pe)
        _key_args(pe)
    pk = psub.add_parser("keygen", help="write a fresh random 256-bit key file, readable by its owner only")
    pk.add_argument("--out", required=True, help="key file to create (an existing file is never replaced)")


def _force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace an existing output (it is kept as NAME.bak-<time>)")


def _key_args(p: argparse.ArgumentParser) -> None:
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--key-env", default=None, metavar="VAR",
                      help="environment variable holding a 32-byte key, base64 or hex (default LMTAILOR_DATA_KEY)")
    keys.add_argument("--key-file", default=None, metavar="FILE", help="key file (see `privacy keygen`)")
    keys.add_argument("--passphrase-env", default=None, metavar="VAR",
                      help="environment variable holding a passphrase (stretched with scrypt)")


def _knowledge_verbs(sub: argparse._SubParsersAction) -> None:
    """kb build|add|search|eval, terms mine|report."""
    kb = sub.add_parser("kb", help="knowledge base: chunk and index documents (BM25 + embeddings), search them")
    ksub = kb.add_subparsers(dest="action", required=True)
    kbb = ksub.add_parser("build", help="chunk, deduplicate and index documents into a knowledge base folder")
    kbb.add_argument("sources", nargs="+", help="files, folders (.md/.rst/.txt and data files) or catalog:NAME")
    kbb.add_argument("--out", required=True, help="knowledge base folder to write")
    kbb.add_argument("--embedder", default="all-minilm-l6-v2", help="bundled all-minilm-l6-v2, a "
                     "sentence-transformers folder, or none (BM25 only)")
    kbb.add_argument("--max-tokens", type=int, default=200, help="chunk size in the embedder's tokens")
    kbb.add_argument("--overlap", type=int, default=40, help="tokens shared by the windows of a long paragraph")
    _force_arg(kbb)
    kba = ksub.add_parser("add", help="add documents to a knowledge base (only the new chunks are embedded)")
    kba.add_argument("kb")
    kba.add_argument("sources", nargs="+")
    kbs = ksub.add_parser("search", help="the best passages for a query, with scores, source files and lines")
    kbs.add_argument("kb")
    kbs.add_argument("query")
    kbs.add_argument("-k", type=int, default=5)
    kbs.add_argument("--mode", choices=["hybrid", "bm25", "dense"], default="hybrid")
    kbs.add_argument("--embedder", default=None, help="refuse to search unless the base was built with this one")
    kbe = ksub.add_parser("eval", help="recall@k and MRR of BM25, dense and hybrid ranking on labeled queries")
    kbe.add_argument("kb")
    kbe.add_argument("queries", help="JSONL: {\"query\", and \"source\" / \"line\" / \"contains\"}")
    kbe.add_argument("-k", type=int, default=5)

    tm = sub.add_parser("terms", help="domain terms: frequent words the tokenizer splits into many tokens")
    tmsub = tm.add_subparsers(dest="action", required=True)
    tmm = tmsub.add_parser("mine", help="rank terms by count x (tokens - 1); feed the list to `tokenizer extend`")
    tmm.add_argument("corpus", help="file, folder or catalog:NAME")
    tmm.add_argument("--out", required=True, help="text file, one term per line")
    tmm.add_argument("--top", type=int, default=200)
    tmm.add_argument("--min-count", type=int, default=3)
    tmm.add_argument("--tokenizer", default="smollm2-135m-instruct", help="model name or folder whose tokenizer "
                     "judges the splits")
    _force_arg(tmm)
    tmr = tmsub.add_parser("report", help="tokens per term and domain perplexity, base vs extended + trained")
    tmr.add_argument("--terms", required=True, help="the terms file given to `tokenizer extend`")
    tmr.add_argument("--base", required=True, help="the model before: name or folder")
    tmr.add_argument("--run", required=True, help="the run trained on the extended vocabulary")
    tmr.add_argument("--text", required=True, help="held-out domain text: file, folder or catalog:NAME")
    tmr.add_argument("--context", type=int, default=512, help="perplexity window in tokens")
    tmr.add_argument("--stride", type=int, default=None, help="tokens the window advances (default context / 2)")
    tmr.add_argument("--out", default=None, help="also write the report as JSON here")


def _run(a: argparse.Namespace) -> int:
    _VERBS[a.verb](a)
    return 0


def _train(a: argparse.Namespace) -> None:
    from lmtailor.config import load_config
    from lmtailor.train import train

    _shift_overrides(a)
    train(load_config(a.recipe, a.overrides), progress=not a.no_progress)


def _auto(a: argparse.Namespace) -> None:
    from lmtailor.auto import auto

    auto(a.data, a.budget, a.out, a.base_model, a.format, a.trials, progress=a.progress, force=a.force)


def _tune(a: argparse.Namespace) -> None:
    from lmtailor.tune import tune

    result = tune(a.recipe, a.overrides, a.trials, a.timeout, a.param, prune=not a.no_prune, progress=a.progress)
    print(json.dumps({k: v for k, v in result.items() if k != "all"}, indent=2))


def _plan(a: argparse.Namespace) -> None:
    from lmtailor.plan import plan, render_plan

    result = plan(a.model, a.gpus, a.seq_len, a.utilisation, a.lora_r, a.optimizer)
    print(json.dumps(result, indent=2) if a.json else render_plan(result))


def _validate(a: argparse.Namespace) -> None:
    from lmtailor.config import load_config
    from lmtailor.train import check_recipe

    _shift_overrides(a)
    print(check_recipe(load_config(a.recipe, a.overrides)))


def _shift_overrides(a: argparse.Namespace) -> None:
    """`train lr=1e-3` gives only overrides: the first one landed in `recipe`."""
    if a.recipe and "=" in a.recipe and not os.path.exists(a.recipe):
        a.overrides, a.recipe = [a.recipe, *a.overrides], None


def _eval(a: argparse.Namespace) -> None:
    from lmtailor.evaluate import evaluate_run

    metrics = evaluate_run(a.run, a.data, fmt=a.format, n_generate=a.generate, max_length=a.max_length,
                           out=a.out, metric=a.metric, context=a.context, stride=a.stride, kb=a.kb,
                           force=a.force)
    print(json.dumps({k: v for k, v in metrics.items() if k != "samples"}, indent=2))


def _generate(a: argparse.Namespace) -> None:
    from lmtailor.generate import answer

    answers_all = answer(a.run, a.prompts, _gen_settings(a), a.system, a.compare, raw=a.raw, speedup=a.speedup,
                         kb=a.kb)
    for prompt, answers in zip(a.prompts, answers_all, strict=True):
        print(f"> {prompt}")
        for who, text in answers.items():
            print(f"[{who}] {text}" if a.compare or who == "sources" else text)


def _chat(a: argparse.Namespace) -> None:
    from lmtailor.generate import chat_loop

    chat_loop(a.run, _gen_settings(a), a.system, speedup=a.speedup, kb=a.kb)


def _tokenizer(a: argparse.Namespace) -> None:
    from lmtailor import tokenizers

    if a.action == "train":
        print(tokenizers.train_tokenizer(a.corpus, a.vocab_size, a.out, a.type, force=a.force))
    else:
        print(tokenizers.extend_tokenizer(a.base, a.terms, a.out, a.corpus, force=a.force))


def _datasets(a: argparse.Namespace) -> None:
    from lmtailor.data import catalog

    if a.action == "list":
        for info in catalog.list_datasets():
            print(f"{info.name:22} {info.format:18} {info.license:14} {info.description}")
    else:
        print(catalog.fetch(a.name, refresh=a.refresh))


def _serve(a: argparse.Namespace) -> None:
    from lmtailor.config import check_speedup
    from lmtailor.serve import Limits, serve

    check_speedup(a.speedup)  # before any model loads
    serve(a.runs, host=a.host, port=a.port, api_key_env=a.api_key_env, speedup=a.speedup,
          limits=Limits(max_batch_size=a.max_batch_size, max_queue=a.max_queue, timeout_s=a.timeout,
                        torch_threads=a.threads), kb=a.kb, engine=a.engine, gguf_type=a.gguf_type)


def _export(a: argparse.Namespace) -> None:
    from lmtailor.export import export_run

    print(json.dumps(export_run(a.run, a.format, a.out, gguf_type=a.gguf_type, force=a.force, ollama=a.ollama),
                     indent=2))


def _prompt(a: argparse.Namespace) -> None:
    from lmtailor.prompting.task import load_task
    from lmtailor.prompting.workflows import optimize_prompt, run_prompt

    task = load_task(a.task, a.overrides)
    if a.action == "run":
        result = run_prompt(task, a.model, a.data, a.pool, a.template, not a.zero_shot, a.limit, a.out,
                            cache=not a.no_cache, force=a.force)
        print(json.dumps({k: v for k, v in result["metrics"].items() if not isinstance(v, dict | list)}, indent=2))
    else:
        optimize_prompt(task, a.model, a.dev, a.pool, a.budget, a.out, cache=not a.no_cache, force=a.force)


def _compare(a: argparse.Namespace) -> None:
    from lmtailor.prompting.compare import compare
    from lmtailor.prompting.report import compare_markdown
    from lmtailor.prompting.task import load_task

    summary = compare(load_task(a.task), a.systems, a.model, a.test, a.pool, a.limit, a.out, cache=not a.no_cache,
                      force=a.force)
    print(compare_markdown(summary), end="")


def _privacy(a: argparse.Namespace) -> None:
    from lmtailor import crypto
    from lmtailor.privacy import canary, scrub

    if a.action in ("encrypt", "decrypt"):
        keys = crypto.KeySource(key_env=None if a.key_file or a.passphrase_env else a.key_env or crypto.DEFAULT_KEY_ENV,
                                key_file=a.key_file, passphrase_env=a.passphrase_env)
        print((crypto.encrypt_path if a.action == "encrypt" else crypto.decrypt_path)(a.path, a.out, keys, a.force))
    elif a.action == "keygen":
        print(crypto.keygen(a.out))
    elif a.action == "scan":
        print(scrub.cli_scan(a.file, as_json=a.json, ner=a.ner, phone_region=a.phone_region,
                             documentation_emails=a.documentation_emails))
    elif a.action == "scrub":
        print(scrub.cli_scrub(a.file, a.out, a.mode, a.salt_env, a.ner, a.audit, a.phone_region,
                              a.documentation_emails, force=a.force))
    elif a.action == "plant":
        print(canary.cli_plant(a.file, a.out, a.repeats, a.pattern, a.seed, force=a.force))
    else:
        print(canary.cli_canary(a.run, a.canaries, a.candidates))


def _kb(a: argparse.Namespace) -> None:
    from lmtailor.knowledge import base, metrics

    if a.action == "build":
        print(base.build_kb(a.sources, a.out, None if a.embedder == "none" else a.embedder, a.max_tokens, a.overlap,
                            force=a.force))
    elif a.action == "add":
        print(base.add_to_kb(a.kb, a.sources))
    elif a.action == "search":
        print(base.search_kb(a.kb, a.query, a.k, a.mode, a.embedder))
    else:
        print(json.dumps(metrics.evaluate_kb(a.kb, a.queries, a.k), indent=2))


def _terms(a: argparse.Namespace) -> None:
    if a.action == "report":
        from lmtailor.vocab import format_report, vocab_report

        print(format_report(vocab_report(a.terms, a.base, a.run, a.text, a.context, a.stride, a.out)))
        return
    from lmtailor.knowledge.terms import mine_terms

    print(mine_terms(a.corpus, a.out, a.tokenizer, a.top, a.min_count, force=a.force))


# One handler per verb: each calls one library function and prints its result.
_VERBS: dict[str, Callable[[argparse.Namespace], None]] = {
    "train": _train, "tune": _tune, "auto": _auto, "validate": _validate, "eval": _eval, "generate": _generate,
    "chat": _chat, "tokenizer": _tokenizer, "datasets": _datasets, "serve": _serve, "export": _export,
    "prompt": _prompt, "compare": _compare, "privacy": _privacy, "kb": _kb, "terms": _terms, "pairs": _pairs,
    "score": _score,
}
_VERBS["plan"] = _plan


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`train r.yaml --no-progress lr=1e-3`)
    if extra and getattr(args, "overrides", None) is not None and all("=" in x and not x.startswith("-")
                                                                        for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # On CPUs with AVX512-BF16, importing bitsandbytes (peft and transformers import it when it is installed) warns
    # that it could not fetch an optional kernel from the Hugging Face hub, before any command runs: noise above
    # every message of ours, whether or not 4-bit layers are used. Its errors still show.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _run(args)
    except LmtailorError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, DataError):
            for line in e.problems[:20]:
                print(f"  {line}", file=sys.stderr)
            if e.count > 20:
                print(f"  ... and {e.count - 20} more", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
