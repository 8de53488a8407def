"""Prompt engineering: task files and templates, few-shot selection, verbalizer scoring, prompt search, compare."""

from lmtailor.prompting.fewshot import register_selector
from lmtailor.prompting.predict import PromptRunner, PromptSpec, parse_answer
from lmtailor.prompting.scoring import ScoreCache, Scorer
from lmtailor.prompting.task import PromptTask, load_task

__all__ = ["PromptRunner", "PromptSpec", "PromptTask", "ScoreCache", "Scorer", "load_task", "parse_answer",
           "register_selector"]
