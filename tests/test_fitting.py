"""Values a recipe leaves unset are chosen from the data, each with a reason; set values are never changed."""

from __future__ import annotations

import json

from lmtailor.cli import main
from lmtailor.config import load_config
from lmtailor.objectives import get_objective
from lmtailor.rundata import build_run_data


def _chats(path, n: int, long_every: int = 10):
    """Alpaca records whose answers are short, except every long_every-th which is about 20x longer."""
    rows = [{"instruction": f"question {i}", "output": ("word " * (120 if i % long_every == 0 else 4)).strip()}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data(args):
    cfg = load_config(None, args)
    objective = get_objective(cfg)
    ctx = objective.context(cfg)
    return build_run_data(objective, ctx, write_audit=False), ctx.cfg


def test_max_length_epochs_lr_and_cadence_follow_the_data(tiny_model, tmp_path):
    data = _chats(tmp_path / "d.jsonl", 200, long_every=40)  # 2.5% long answers: the 95% quantile is a short one
    fitted, cfg = _data([f"base_model={tiny_model}", f"data.path={data}", "data.val_size=10", "batch_size=8"])
    chosen = {c.key: c for c in fitted.choices}
    import re

    longest = int(re.search(r"longest (\d+)", chosen["max_length"].reason).group(1))
    kept = [len(fitted.train_items[i].input_ids) for i in range(len(fitted.train_items))]
    assert cfg.max_length % 32 == 0 and cfg.max_length < longest and max(kept) == cfg.max_length
    assert sum(n < cfg.max_length for n in kept) / len(kept) >= 0.95  # the short answers are never cut
    assert "training examples fit" in chosen["max_length"].reason and cfg.pack_length >= cfg.max_length
    # 190 examples at batch 8: 23 steps per epoch, so enough epochs for ~150 steps, capped at 3
    assert cfg.epochs == 3.0 and "23 steps per epoch" in chosen["epochs"].reason
    # 69 steps planned: a short LoRA run learns at 1e-3; a long one at LoRA's usual 2e-4
    assert cfg.lr == 1e-3 and chosen["lr"].reason == "method lora, a short run (69 steps planned, at most 300)"
    _, long_run = _data([f"base_model={tiny_model}", f"data.path={data}", "data.val_size=10", "max_steps=301"])
    assert long_run.lr == 2e-4
    assert cfg.eval_every == 69 // 5 and cfg.early_stopping_patience == 3 and cfg.metric_for_best == "loss"
    assert not cfg.group_by_length and "group_by_length" not in chosen  # packed rows: nothing to group
    varied = _chats(tmp_path / "v.jsonl", 200, long_every=3)  # a third of the answers 30x longer
    _, unpacked = _data([f"base_model={tiny_model}", f"data.path={varied}", "data.val_size=10", "packing=false",
                         "max_length=512"])
    assert unpacked.group_by_length  # padded batches of mixed lengths group by length


def test_set_keys_are_never_changed(tiny_model, tmp_path):
    data = _chats(tmp_path / "d.jsonl", 200)
    given = ["max_length=64", "epochs=1", "lr=1e-3", "eval_every=0", "method=full"]
    fitted, cfg = _data([f"base_model={tiny_model}", f"data.path={data}", "data.val_size=10", *given])
    assert (cfg.max_length, cfg.epochs, cfg.lr, cfg.eval_every) == (64, 1.0, 1e-3, 0)
    # only retrieval is chosen, and kept off: the set max_length is for prompts without retrieved pairs
    (retrieval,) = fitted.choices
    assert retrieval.key == "data.retrieved_examples" and retrieval.value == 0 and "max_length=64" in retrieval.reason
    assert cfg.data.retrieved_examples == 0
    full, cfg = _data([f"base_model={tiny_model}", f"data.path={data}", "data.val_size=10", "method=full",
                       "max_steps=5"])
    assert cfg.lr == 2e-5 and "epochs" not in {c.key for c in full.choices}  # max_steps rules out an epoch choice


def test_classification_picks_its_best_checkpoint_by_macro_f1_and_a_head_rate(tiny_model, tmp_path):
    rows = [{"text": f"{'goal match' if i % 2 else 'bank loan'} {i}", "label": "sport" if i % 2 else "money"}
            for i in range(120)]
    path = tmp_path / "l.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, cfg = _data([f"base_model={tiny_model}", f"data.path={path}", "objective=classify", "data.val_size=20"])
    assert cfg.metric_for_best == "macro_f1" and cfg.lr == 1e-3 and cfg.max_length <= 32
    assert not cfg.group_by_length  # texts of one length: random batches pad little, nothing to group
    mixed = tmp_path / "mixed.jsonl"  # every 4th text 20x longer: random batches would be mostly padding
    mixed.write_text("".join(json.dumps({"text": ("goal match " * (20 if i % 4 == 0 else 1)) + str(i),
                                         "label": "sport" if i % 2 else "money"}) + "\n" for i in range(120)))
    fitted, cfg = _data([f"base_model={tiny_model}", f"data.path={mixed}", "objective=classify", "data.val_size=20"])
    chosen = {c.key: c for c in fitted.choices}
    assert cfg.group_by_length and "padding" in chosen["group_by_length"].reason
    _, ungrouped = _data([f"base_model={tiny_model}", f"data.path={mixed}", "objective=classify", "data.val_size=20",
                          "group_by_length=false"])
    assert not ungrouped.group_by_length  # a set value stays


def test_train_prints_the_choices_and_writes_them_to_the_resolved_config(tiny_model, tmp_path, capsys):
    import yaml

    data = _chats(tmp_path / "d.jsonl", 40)
    run = tmp_path / "run"
    assert main(["train", f"base_model={tiny_model}", f"data.path={data}", f"output_dir={run}", "max_steps=2",
                 "data.val_size=4", "eval.before_after=false", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "chosen from the data: data.retrieved_examples=1 (" in out and "; max_length=" in out
    assert "lr=0.001 (method lora, a short run (2 steps" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["max_length"] < 512 and saved["lr"] == 1e-3 and saved["data"]["retrieved_examples"] == 1
    assert main(["validate", f"base_model={tiny_model}", f"data.path={data}", "data.val_size=4"]) == 0
    assert "chosen from the data: max_length=" in capsys.readouterr().out


def test_padding_share_counts_the_padded_positions():
    from lmtailor.fitting import padding_share

    assert padding_share([5] * 16, 8) == 0.0
    assert abs(padding_share([1, 3], 2) - 1 / 3) < 1e-9  # one batch padded to 3: 6 positions, 4 real


def _documents(path, n: int, words: int):
    """Labeled texts of about `words` words whose topic words are spread through the text."""
    topics = {"sport": ["goal", "match", "team"], "money": ["bank", "loan", "rate"]}
    rows = []
    for i in range(n):
        label = "sport" if i % 2 else "money"
        rows.append({"text": " ".join(topics[label][j % 3] if j % 5 == 0 else f"w{(i * 7 + j) % 50}"
                                      for j in range(words)), "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_documents_cut_at_max_length_get_a_mean_pooled_probe_fitted_head(tiny_model, tmp_path, capsys):
    import yaml

    docs = _documents(tmp_path / "docs.jsonl", 60, 40)
    args = [f"base_model={tiny_model}", f"data.path={docs}", "objective=classify", "data.val_size=10"]
    fitted, cfg = _data([*args, "max_length=16"])  # every text is cut
    chosen = {c.key: c for c in fitted.choices}
    assert (cfg.settings.pooling, cfg.settings.head_init) == ("mean", "probe")
    assert "100% of 40 training texts are longer than max_length=16" in chosen["classify.pooling"].reason
    assert "linear probe" in chosen["classify.head_init"].reason
    assert cfg.lr == 2e-4 and "from a head fitted as a linear probe" in chosen["lr"].reason  # not a new head's rate
    # texts that fit, a set key, or a multi-label head: the head stays as the recipe has it
    for extra, want in ((["max_length=512"], ("last", "random")), (["max_length=16", "classify.pooling=last"],
                        ("last", "random")), (["max_length=16", "classify.head_init=random"], ("last", "random"))):
        fitted, other = _data([*args, *extra])
        assert (other.settings.pooling, other.settings.head_init) == want, extra
        assert not {"classify.pooling", "classify.head_init"} & {c.key for c in fitted.choices}
    # a real run: the choice is printed, written to config.yaml, the probe is fitted and the head reads the mean
    run = tmp_path / "run"
    assert main(["train", *args, "max_length=16", f"output_dir={run}", "max_steps=2", "eval.before_after=false",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "chosen from the data: " in out and "classify.pooling=mean (100% of" in out
    assert "head: a linear probe on 40 training texts (mean-pooled" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["classify"]["pooling"] == "mean" and saved["classify"]["head_init"] == "probe"
    model_config = json.loads(next(run.glob("model/**/config.json")).read_text())
    assert model_config["lmtailor_pooling"] == "mean" and len(model_config["lmtailor_head_bias"]) == 2


def test_only_a_decoder_only_model_gets_the_mean_pooled_head(tmp_path):
    from transformers import BertConfig, LlamaConfig, T5Config

    from lmtailor.config import build_config
    from lmtailor.fitting import _decoder_only

    kinds = {"llama": (LlamaConfig(), True), "bert": (BertConfig(), False), "t5": (T5Config(), False)}
    for name, (config, want) in kinds.items():
        config.save_pretrained(tmp_path / name)
        cfg = build_config({"base_model": str(tmp_path / name), "objective": "classify",
                            "data": {"path": "unused.jsonl"}}, "test")
        assert _decoder_only(cfg) is want, name


def test_every_method_gets_a_learning_rate_when_none_is_set(tiny_model, tmp_path):
    """qlora once had no default (KeyError 'qlora' before the first step); it trains the same adapters as lora."""
    import typing

    from lmtailor.config import RunConfig

    data = _chats(tmp_path / "d.jsonl", 60)
    methods = typing.get_args(RunConfig.model_fields["method"].annotation)
    assert "qlora" in methods
    for method in methods:
        for steps in (400, 20):
            _, cfg = _data([f"base_model={tiny_model}", f"data.path={data}", "data.val_size=10",
                            f"method={method}", f"max_steps={steps}"])
            assert cfg.lr > 0, method
    _, short = _data([f"base_model={tiny_model}", f"data.path={data}", "data.val_size=10", "method=qlora",
                      "max_steps=20"])
    _, long_run = _data([f"base_model={tiny_model}", f"data.path={data}", "data.val_size=10", "method=qlora",
                         "max_steps=400"])
    assert (short.lr, long_run.lr) == (1e-3, 2e-4)  # as lora: a short run at 1e-3, a long one at 2e-4
