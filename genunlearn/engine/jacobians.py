"""Per-sample Jacobians of a classifier's logits with respect to a parameter subset (an NTK scope).

Two paths, both for a model in eval mode (samples independent):
- ``functional_jacobians``: ``vmap(jacrev(...))`` over ``functional_call``, any parameters (prompts, heads, ...).
- ``batchnorm_jacobians``: BatchNorm affine parameters (and a linear head) from K batched backward passes to the
  BatchNorm outputs followed by per-sample channel reductions: ∂f_k/∂γ_c = Σ_hw ∂f_k/∂y_c · x̂_c and
  ∂f_k/∂β_c = Σ_hw ∂f_k/∂y_c. One backward per class for a whole batch instead of one per sample and class.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from genunlearn.errors import UserError

NamedParameters = list[tuple[str, nn.Parameter]]


@contextmanager
def plain_attention(model: nn.Module) -> Iterator[None]:
    """timm attention blocks compute softmax(QKᵀ)V by hand instead of the fused kernel while inside: vmap has no
    batching rule for the fused CPU kernel and falls back to a per-sample loop (~1.8x slower on vit-digits)."""
    blocks = [module for module in model.modules() if getattr(module, "fused_attn", False)]
    for block in blocks:
        block.fused_attn = False
    try:
        yield
    finally:
        for block in blocks:
            block.fused_attn = True


def functional_jacobians(model: nn.Module, params: NamedParameters, images: torch.Tensor,
                         chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(J [B, K, P], logits [B, K])``: J's columns are ``params`` flattened in order."""
    values = {name: param.detach() for name, param in params}

    def logits_of(values: dict, image: torch.Tensor) -> torch.Tensor:
        return functional_call(model, values, (image.unsqueeze(0),)).squeeze(0)

    with plain_attention(model):
        jacobian = vmap(jacrev(logits_of), in_dims=(None, 0), chunk_size=chunk_size)(values, images)
    batch = len(images)
    columns = torch.cat([jacobian[name].reshape(batch, jacobian[name].shape[1], -1) for name, _ in params], dim=2)
    with torch.no_grad():
        logits = model(images)
    return columns, logits


def batchnorm_jacobians(model: nn.Module, params: NamedParameters, images: torch.Tensor,
                        head: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(J [B, K, P], logits [B, K])`` for ``params`` that are BatchNorm weights/biases (running statistics, eval
    mode) or the weight/bias of ``head`` (a linear layer producing the logits)."""
    owners = {}
    for module in model.modules():
        if isinstance(module, _BatchNorm) or module is head:
            for kind, param in module.named_parameters(recurse=False):
                owners[id(param)] = (module, kind)
    if any(id(param) not in owners for _, param in params):
        unknown = next(name for name, param in params if id(param) not in owners)
        raise UserError(f"the BatchNorm Jacobian path covers BatchNorm affine and head parameters, not {unknown}")
    modules = list(dict.fromkeys(owners[id(param)][0] for _, param in params))
    saved: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if module is head:
            saved[module] = (inputs[0].detach(), output)
            return output
        if module.running_mean is None:
            raise UserError("BatchNorm without running statistics couples the samples; the NTK needs eval-mode BN")
        shape = (1, -1) + (1,) * (output.dim() - 2)
        normalized = (inputs[0].detach() - module.running_mean.view(shape)) / torch.sqrt(module.running_var.view(shape) + module.eps)
        saved[module] = (normalized, output)
        return output.clone()  # later in-place ops (ReLU(inplace=True)) must not overwrite the tensor we differentiate to

    hooks = [module.register_forward_hook(keep) for module in modules]
    bn_modules = [module for module in modules if module is not head]
    reduced: dict[tuple[nn.Module, str], list[torch.Tensor]] = {(m, kind): [] for m in bn_modules for kind in ("weight", "bias")}
    try:
        with torch.enable_grad():
            logits = model(images)
            outputs = [saved[module][1] for module in bn_modules]
            for k in range(logits.shape[1]):
                grads = torch.autograd.grad(logits[:, k].sum(), outputs, retain_graph=k + 1 < logits.shape[1]) if outputs else []
                for module, grad in zip(bn_modules, grads):  # reduce at once: only [B, C] per class is kept
                    spatial = tuple(range(2, grad.dim()))
                    weight, bias = grad * saved[module][0], grad
                    reduced[module, "weight"].append(weight.sum(dim=spatial) if spatial else weight)
                    reduced[module, "bias"].append(bias.sum(dim=spatial) if spatial else bias)
    finally:
        for hook in hooks:
            hook.remove()
    batch, classes = logits.shape
    columns = []
    for _, param in params:
        module, kind = owners[id(param)]
        if module is head:
            features = saved[module][0]
            eye = torch.eye(classes, dtype=logits.dtype, device=logits.device)
            if kind == "weight":  # ∂f_k/∂W = e_k φᵀ
                columns.append((eye[None, :, :, None] * features[:, None, None, :]).reshape(batch, classes, -1))
            else:
                columns.append(eye.expand(batch, classes, classes))
            continue
        columns.append(torch.stack(reduced[module, kind], dim=1))
    return torch.cat(columns, dim=2).detach(), logits.detach()
