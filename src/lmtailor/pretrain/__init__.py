"""Pretraining support: models built from scratch, the streamed token cache of a corpus, structure changes
(depth pruning, RoPE scaling). The pretraining objectives themselves (clm, mlm, span) live in lmtailor.objectives.
"""
