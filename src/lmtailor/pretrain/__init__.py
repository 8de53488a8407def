"""Pretraining: models from scratch, masked LM and span corruption, token caches, structure changes, perplexity.

Importing `lmtailor.pretrain.objectives` registers the `mlm` and `span` objectives and makes `clm` build models from
scratch (`pretrain.scratch`), read the token cache (`pretrain.cache`) and apply structure changes.
"""
