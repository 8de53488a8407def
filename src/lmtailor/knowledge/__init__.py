"""Knowledge enhancement: a knowledge base of the user's documents (chunked, indexed by BM25 and dense embeddings,
searched by either or both fused), the retrieval that puts its passages into prompts in training, evaluation and
serving alike, retrieval-aware training examples, retrieval metrics and domain-term mining.

Modules, bottom up: `chunk` (documents -> chunks), `fusion` (reciprocal rank fusion), `embed` (sentence
embeddings), `base` (the base on disk and its search), `prompt` (passages into a conversation), `raft`
(retrieval-aware training data), `metrics` (recall@k, MRR), `terms` (domain-term mining).
"""
