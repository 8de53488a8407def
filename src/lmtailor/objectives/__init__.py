"""Training objectives, registered by short name (`objective: NAME` in a recipe).

`registry` is the leaf every objective registers into; importing this package imports the built-in objectives
(each module registers itself): sft and clm (causal), mlm, span, classify, seq2seq (an alias of seq2seq_encdec or
seq2seq_causal), the preference objectives dpo, ipo, orpo, simpo and kto, reward, and grpo. Another package adds
one with `register_objective` (see registry's docstring for the hooks).
"""

from lmtailor.objectives import causal, classify, grpo, mlm, preference, reward, seq2seq, span  # noqa: F401  (each registers itself)
from lmtailor.objectives.registry import (
    OBJECTIVES,
    Evaluation,
    Objective,
    ObjectiveContext,
    get_objective,
    register_objective,
)

__all__ = ["OBJECTIVES", "Evaluation", "Objective", "ObjectiveContext", "get_objective", "register_objective"]
