"""grpo: sampled groups scored by the recipe's rewards; a planted reward raises the mean reward; exact resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lmtailor.cli import main
from lmtailor.config import build_config
from lmtailor.errors import ConfigError
from lmtailor.objectives.grpo import GrpoRewards, Rewarder

FAST = ["objective=grpo", "batch_size=4", "data.val_size=4", "grpo.group=4", "grpo.max_new_tokens=6",
        "lora.target_modules=all-linear", "early_stopping_patience=0", "--no-progress"]


@pytest.fixture
def prompts(tmp_path):
    from conftest import PAIRS

    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"{q} {i}", "output": a}) + "\n" for i in range(2)
                            for q, a in PAIRS))
    return path


def test_builtin_rewards_and_an_explicit_function(tmp_path):
    (tmp_path / "rewards.py").write_text("def score(prompt, answer, reference):\n    return len(answer) / 10\n")
    spec = GrpoRewards(exact_match=1.0, regex=r"^ls\b", regex_weight=0.5, length=4, length_weight=0.1, stop=0.2,
                       function=f"{tmp_path / 'rewards.py'}:score")
    r = Rewarder(spec)
    assert r("p", "ls -la", "ls -la", True) == pytest.approx(1.0 + 0.5 - 0.1 * 2 / 4 + 0.2 + 0.6)
    assert r("p", "cd", "ls -la", False) == pytest.approx(-0.1 * 2 / 4 + 0.2)


def test_reward_settings_are_checked():
    with pytest.raises(ConfigError, match="set at least one reward"):
        build_config({"objective": "grpo", "grpo": {"reward": {"stop": 0}}})
    with pytest.raises(ConfigError, match="FILE.py:NAME"):
        build_config({"objective": "grpo", "grpo": {"reward": {"function": "os.system"}}})


def test_planted_reward_raises_the_mean_reward(tiny_model, prompts, tmp_path):
    """The planted reward prefers short answers (a function of the answer's length, from a file of the test's own):
    the policy learns to write fewer characters (the token count can stay at the cap). Full fine-tuning: on this
    random tiny model LoRA cannot move the output distribution (tied embeddings of std 0.02 bound every logit near
    +-1.3 and the LM head is not adapted), so under LoRA the reward moved only by evaluation noise (+0.15 to -0.03
    over seeds, on main too)."""
    (tmp_path / "rewards.py").write_text("def score(prompt, answer, reference):\n"
                                         "    return -len(answer) / 10\n")
    run = tmp_path / "grpo"
    assert main(["train", f"base_model={tiny_model}", f"data.path={prompts}", f"output_dir={run}", *FAST,
                 "max_steps=30", "method=full", "lr=1e-2", "grpo.beta=0.0",
                 f"grpo.reward.function={tmp_path / 'rewards.py'}:score", "grpo.reward.stop=0"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    assert after["reward_mean"] > before["reward_mean"] + 0.08, (before, after)


def test_grpo_resume_equals_an_uninterrupted_run(tiny_model, prompts, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    extra = [*FAST, "max_steps=6", "save_every=3", "keep_checkpoints=5", "eval.before_after=false", "lr=1e-2"]
    assert main(["train", f"base_model={tiny_model}", f"data.path={prompts}", f"output_dir={full}", *extra]) == 0
    assert main(["train", f"base_model={tiny_model}", f"data.path={prompts}", f"output_dir={part}", *extra]) == 0
    shutil.rmtree(part / "model")
    hist = (part / "history.jsonl").read_text().splitlines()[:3]
    (part / "history.jsonl").write_text("".join(h + "\n" for h in hist))
    assert main(["train", f"base_model={tiny_model}", f"data.path={prompts}", f"output_dir={part}", *extra,
                 "resume=true"]) == 0
    a = load_file(full / "model" / "adapter_model.safetensors")
    b = load_file(part / "model" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_samples_do_not_depend_on_their_batch(tiny_model, prompts):
    """Each answer is drawn with its own seed (seed, step, item, answer): a prompt sampled alone, unpadded, gets the
    answers it gets in a padded batch of six (what makes N processes sample what one does); another step, others."""
    from conftest import lora_batch
    from lmtailor.objectives.grpo import sample_seeds

    _, loss, batch = lora_batch(tiny_model, prompts, "objective=grpo", "grpo.group=3", "grpo.max_new_tokens=8")
    loss.model.eval()
    ids, mask, keys, index = batch["prompt_ids"], batch["prompt_mask"], batch["text_key"], batch["item_index"]
    together = loss.rollout(ids, mask, keys, 3, sample_seeds(0, 5, index.tolist(), 3)).answers
    alone = []
    for r in range(len(ids)):
        row = ids[r][mask[r].bool()][None]  # (1, P) without the batch's left padding
        alone += loss.rollout(row, torch.ones_like(row), keys[r:r + 1], 3, sample_seeds(0, 5, [int(index[r])], 3)
                              ).answers
    assert together == alone
    assert len(set(together)) > len(together) // 2  # sampled, not one greedy answer per prompt
    assert loss.rollout(ids, mask, keys, 3, sample_seeds(0, 6, index.tolist(), 3)).answers != together


def test_seeded_sampler_draws_from_the_softmax_at_the_temperature():
    """The Gumbel-max sampler with per-answer seeds is an exact draw from softmax(logits / T): on a toy distribution
    its empirical frequencies match, each answer's seed differs from its group's others and from other steps'."""
    from lmtailor.objectives.grpo import GumbelSampler, sample_seeds

    seeds = sample_seeds(0, 3, range(1000), 4)
    assert len(set(seeds)) == len(seeds) and not set(seeds) & set(sample_seeds(0, 4, range(1000), 4))
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    for t in (0.5, 1.0, 2.0):
        drawn = GumbelSampler(seeds, t)(torch.zeros(0), logits.expand(len(seeds), -1).clone()).argmax(1)
        freq = torch.bincount(drawn, minlength=len(logits)).float() / len(seeds)
        assert torch.allclose(freq, torch.softmax(logits / t, 0), atol=0.025), (t, freq)
    groups = GumbelSampler(seeds, 1.0)(torch.zeros(0), torch.zeros(len(seeds), 50)).argmax(1).view(-1, 4)
    assert (groups != groups[:, :1]).any(1).float().mean() > 0.9  # a group's answers differ (variance to learn from)
