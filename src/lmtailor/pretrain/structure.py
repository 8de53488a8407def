"""Structure changes of a pretrained decoder, written into its config so plain transformers reloads the result."""

from __future__ import annotations

from typing import Any

from torch import nn

from lmtailor.errors import ModelError
from lmtailor.models import unwrap_peft


def _decoder(model: nn.Module) -> nn.Module:
    inner = getattr(unwrap_peft(model), "model", None)
    if inner is None or not isinstance(getattr(inner, "layers", None), nn.ModuleList):
        raise ModelError(f"{type(model).__name__} has no decoder layer list (model.model.layers)",
                         "depth pruning and RoPE scaling support llama-style decoders (llama, mistral, qwen2, ...)")
    return inner


def keep_first_layers(model: nn.Module, n: int) -> nn.Module:
    """Depth pruning: keep the first `n` decoder layers (in place); config.num_hidden_layers follows."""
    decoder = _decoder(model)
    layers: Any = decoder.layers
    have = len(layers)
    if not 1 <= n <= have:
        raise ModelError(f"cannot keep {n} layers of a model with {have}", f"choose 1..{have}")
    decoder.layers = nn.ModuleList(list(layers)[:n])
    config: Any = unwrap_peft(model).config
    config.num_hidden_layers = n
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:n]
    return model


def scale_rope(model: nn.Module, factor: float) -> nn.Module:
    """Context extension: linear RoPE position interpolation by `factor`; max_position_embeddings grows by it.

    Linear scaling divides positions by `factor`, so a model trained to position P sees positions up to P·factor
    as angles it knows; a short continued pretraining at the new length recovers most of the quality.
    """
    decoder = _decoder(model)
    config: Any = unwrap_peft(model).config
    params = getattr(config, "rope_parameters", None)
    rotary = getattr(decoder, "rotary_emb", None)
    if not isinstance(params, dict) or rotary is None:
        raise ModelError(f"{type(model).__name__} does not use rotary position embeddings",
                         "RoPE scaling needs a RoPE model (llama, mistral, qwen2, ...)")
    if params.get("rope_type", "default") != "default":
        raise ModelError(f"the model already uses {params['rope_type']!r} RoPE scaling")
    config.rope_parameters = {**params, "rope_type": "linear", "factor": float(factor)}
    config.max_position_embeddings = int(config.max_position_embeddings * factor)
    device = next(model.parameters()).device
    decoder.rotary_emb = type(rotary)(config=config).to(device)
    return model
