"""Prompts with k free word embeddings after the start token: what UnlearnDiffAtk searches over and AdvUnlearn trains
against (the references' ``prefix_k``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from genunlearn.errors import UserError


def require_single_clip(task, what: str, instead: str) -> None:
    """A UserError unless ``task`` is a Stable Diffusion 1.x/2.x task (one CLIP text encoder), where ``what`` (an
    attack or a method working in its word-embedding space) is defined; ``instead``: what to use otherwise."""
    if not issubclass(task.pipeline_class, StableDiffusionPipeline):
        raise UserError(f"{what} works in a Stable Diffusion 1.x/2.x text encoder's embedding space; "
                        f"{task.pipeline_class.__name__} is not served: {instead}")


def with_prefix(ids: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Token ids ``[L]`` with ``prefix`` ``[k]`` after the start token, the last k cut (the reference's ``prefix_k``)."""
    return torch.cat([ids[:1], prefix, ids[1:len(ids) - len(prefix)]])


def encode_with_prefix(task, encoders: Sequence[nn.Module], ids: torch.Tensor, prefix: torch.Tensor,
                       prefix_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The conditioning ``[1, L, D]`` that ``encoders`` (a Stable Diffusion task's one CLIP encoder, ``task``'s
    ``encode_tokens``) make of the prompt ``ids`` ``[L]`` with the word embeddings ``prefix`` ``[k, D]`` after its
    start token (position embeddings added as to any word's); differentiable in ``prefix`` and the encoder's weights.
    ``prefix_ids`` ``[k]``: the ids written at those places (only pooling reads them; default: the end token)."""
    k = len(prefix)
    placeholder = ids[-1:].repeat(k) if prefix_ids is None else prefix_ids
    token_embedding = encoders[0].get_input_embeddings()
    replaced = lambda module, inputs, output: torch.cat([output[:, :1], prefix[None].to(output), output[:, 1 + k:]], 1)
    hook = token_embedding.register_forward_hook(replaced)
    try:
        return task.encode_tokens(encoders, [with_prefix(ids, placeholder.cpu())[None].to(token_embedding.weight.device)])[
            "encoder_hidden_states"]
    finally:
        hook.remove()
