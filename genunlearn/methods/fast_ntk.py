"""``fast_ntk``: NTK scrubbing (Golatkar et al., ECCV 2020) restricted to a parameter-efficient scope (Fast-NTK,
Li et al., CVPRW 2024).

The model is linearised in the scope θ_p at its trained weights; with per-sample Jacobians J_i (K×P) and
residuals r_i (softmax(f) − onehot(y) for cross-entropy, f − (2·onehot(y) − 1) for the squared loss), the ridge
solutions on D and on D_r are Δ = −(Σ JᵀJ + Nλ I)⁻¹ (Σ Jᵀr + Nλ o), and the scope moves by s·(Δ_retain − Δ_all).
The reference notebook centres the ridge on the linearisation point (o = 0, ``ridge_centre: point``);
``ridge_centre: start`` centres it on the scope's PEFT start θ_start (o = θ_p − θ_start), where training's L2
penalty pulls, which makes the scrub the exact ridge retrain of a model linear in its scope. The trapezium scale s
measures the linearisation's error as the notebook does, θ_trained − θ_start − Δ_retain (its θ_init is the
fine-tuning start). Primal (P×P, streamed) when P < N·K, dual (NK×NK) otherwise; float64 Cholesky solves.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from genunlearn.advice import advise
from genunlearn.data.split import ForgetSplit
from genunlearn.engine.ntk import add_fisher_noise, flat, prediction_fisher, scrub_direction, trapezium_scale
from genunlearn.errors import UserError
from genunlearn.methods.common import require_classifier
from genunlearn.methods.registry import UnlearnResult, register_method
from genunlearn.models.peft import scope_initial_values, scope_parameters
from genunlearn.tasks.base import Task

FORMS = ("auto", "primal", "dual")
JACOBIAN_PATHS = ("auto", "batchnorm", "functional")


@dataclass
class FastNTKConfig:
    """Defaults: λ = 0.1 (the reference notebook's weight decay; a model trained with ``decay_to: start`` should
    use its training weight decay), the notebook's ``trapezium`` scale (its "Scrub using NTK" cell multiplies the
    direction by the predicted scale; a number, e.g. 1, scales by that instead), the BatchNorm scope with the
    head, residuals of the loss the model was trained on (``auto``; or ``ce``, ``mse``: f − (2y − 1)).
    ``linearize_at``: ``trained`` (the notebook computes its Jacobians at the trained model) or ``init`` (the
    scope's PEFT start); ``ridge_centre``: ``point`` (the notebook: the ridge penalises the step from the
    linearisation point) or ``start`` (the scope's PEFT start: exact for a model linear in its scope). ``chunk_size``: samples per Jacobian chunk (memory ~ chunk·K·P); ``jacobian``:
    ``batchnorm`` (K batched backward passes; BN/head scopes), ``functional`` (vmap(jacrev)), ``auto`` picks the
    first that applies. ``fisher_noise``: α of the reference's optional Fisher-noise stage (0: off)."""

    scope: str = "batchnorm+head"
    ridge: float = 0.1
    loss: str = "auto"
    linearize_at: str = "trained"
    ridge_centre: str = "point"
    scale: str | float = "trapezium"
    form: str = "auto"
    jacobian: str = "auto"
    chunk_size: int = 32
    fisher_noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.form not in FORMS or self.jacobian not in JACOBIAN_PATHS:
            raise UserError(f"fast_ntk form must be one of {FORMS} and jacobian one of {JACOBIAN_PATHS}")
        if self.loss not in ("auto", "ce", "mse") or self.linearize_at not in ("trained", "init"):
            raise UserError("fast_ntk loss must be auto, ce or mse and linearize_at trained or init")
        if self.ridge_centre not in ("point", "start"):
            raise UserError(f"fast_ntk ridge_centre must be point (the reference) or start, got {self.ridge_centre!r}")
        if self.ridge <= 0 or self.chunk_size < 1 or self.fisher_noise < 0:
            raise UserError("fast_ntk needs ridge > 0, chunk_size >= 1 and fisher_noise >= 0")
        if not (self.scale == "trapezium" or isinstance(self.scale, (int, float)) and self.scale > 0):
            raise UserError(f"fast_ntk scale must be a positive number or 'trapezium', got {self.scale!r}")


def check_trained_in_scope(trained: str | None, scope: str, main_process: bool) -> None:
    """Warn when ``scope`` is not inside the PEFT scope the model was trained in (``trained``; None: all weights)."""
    if trained is None or not set(scope.split("+")) <= set(trained.split("+")):
        advise(f"fast_ntk scrubs the {scope} scope as if only it moved in training (the reference fine-tunes only it from a "
               f"fixed backbone), but this model was trained in {trained or 'all its weights'}: its linearisation may not "
               f"describe it. Use a model trained in the scope (a preset with peft: {scope}) or another method (sfron)",
               main_process)


@register_method("fast_ntk", "Fast-NTK: NTK scrubbing of a parameter-efficient scope (BatchNorm affine / prompts, + head)", FastNTKConfig,
                 kinds=("classifier",))
def fast_ntk(task: Task, split: ForgetSplit, cfg: FastNTKConfig, accelerator: Accelerator, *, checkpoint_dir=None,
             resume: bool = False) -> UnlearnResult:
    started = time.perf_counter()
    require_classifier(task, "fast_ntk")
    check_trained_in_scope(getattr(getattr(task, "preset", None), "peft", None), cfg.scope, accelerator.is_main_process)
    if cfg.loss == "auto":
        cfg = dataclasses.replace(cfg, loss=getattr(getattr(task.preset, "train", None), "loss", "ce"))
    model = copy.deepcopy(task.model).to(accelerator.device, memory_format=torch.channels_last).eval()
    params = scope_parameters(model, cfg.scope)
    start = torch.cat([value.reshape(-1).double() for value in scope_initial_values(model, cfg.scope)]).to(accelerator.device)
    linearized = model
    if cfg.linearize_at == "init":
        linearized = copy.deepcopy(model)
        with torch.no_grad():
            for (_, param), value in zip(scope_parameters(linearized, cfg.scope), scope_initial_values(model, cfg.scope)):
                param.copy_(value)
    point = flat(scope_parameters(linearized, cfg.scope)).to(accelerator.device)
    offset = point - start if cfg.ridge_centre == "start" else torch.zeros_like(point)
    direction, retain_step, info = scrub_direction(linearized, scope_parameters(linearized, cfg.scope), offset,
                                                   split, accelerator, form=cfg.form, ridge=cfg.ridge,
                                                   chunk_size=cfg.chunk_size, path=cfg.jacobian, loss=cfg.loss)
    trained = flat(params).to(accelerator.device)
    scale = trapezium_scale(direction, trained - start - retain_step) if cfg.scale == "trapezium" else float(cfg.scale)
    with torch.no_grad():
        offset = 0
        for _, param in params:
            param += (scale * direction[offset : offset + param.numel()]).view_as(param).to(param.dtype)
            offset += param.numel()
    if cfg.fisher_noise > 0:
        fisher = prediction_fisher(model, params, split.retain, accelerator, chunk_size=cfg.chunk_size, path=cfg.jacobian)
        forgotten = split.spec.classes if split.spec.kind == "class" else ()
        add_fisher_noise(model, params, fisher, cfg.fisher_noise, forgotten, cfg.seed)
    info.update(scale=scale, direction_norm=float(direction.detach().norm()), scope=cfg.scope, loss=cfg.loss,
                ridge_centre=cfg.ridge_centre, fisher_noise=cfg.fisher_noise)
    model = model.to(memory_format=torch.contiguous_format)  # contiguous weights again (safetensors needs them)
    return UnlearnResult(model, [], 0, time.perf_counter() - started, info)
