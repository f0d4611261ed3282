"""``uce_adv``: genunlearn's combination of UCE's closed form with AdvUnlearn's adversarial prompts, no training.

UCE maps the concept's last-word embedding to the guide's, but a prompt with a few words before the concept gives that
word another embedding, which the edit only partly moves (UnlearnDiffAtk finds such prefixes). Each round here attacks
the current edit as AdvUnlearn's training does (``soft_prompt_attack``: k word embeddings before the concept prompt,
moved by Adam so that the edited model's prediction under them matches the original's on the concept, at an x_t the
original sampled part-way), adds the text encoder's embedding of the concept's last word in each context found as one
more row to erase, and solves UCE's edit of the original projections again with every row found so far, the retain
prompts preserved (RECE's rounds, with AdvUnlearn's adversary in place of RECE's free embedding). Stable Diffusion
1.x/2.x (one CLIP encoder)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from genunlearn.errors import UserError
from genunlearn.methods.advunlearn_parts import accumulated_adam
from genunlearn.methods.common import require_text_to_image, working_copy
from genunlearn.methods.esd import partially_sampled, sampling_schedule
from genunlearn.methods.registry import UnlearnResult, register_method
from genunlearn.methods.uce import UCEConfig, edit_rows, last_word_index, uce_edit
from genunlearn.models.prompt_prefix import encode_with_prefix, require_single_clip
from genunlearn.noise import NoiseSource, derive_seed, drawing_from


@dataclass
class AdversarialUCEConfig:
    """``rounds`` of ``contexts`` adversarial prefixes per concept; each prefix ``attack_tokens`` word embeddings (the
    k of UnlearnDiffAtk, the attack it defends against) moved by ``attack_steps`` Adam steps at ``attack_lr``
    (AdvUnlearn's 30 and 1e-3) from random words; x_t as ESD samples it (``ddim_steps``, ``start_guidance``). The
    edit: UCE's (λ = 0.5, scales 1, the last word's token, guide ``""`` or ``--anchor``), the retain prompts
    preserved (``preserve: none`` drops them)."""

    rounds: int = 3
    contexts: int = 4
    attack_tokens: int = 3
    attack_steps: int = 30
    attack_lr: float = 1e-3
    ddim_steps: int = 50
    start_guidance: float = 3.0
    preserve: str = "retained"
    lamb: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.contexts, self.attack_tokens, self.ddim_steps - 1) < 1 or min(self.rounds, self.attack_steps) < 0:
            raise UserError("uce_adv needs contexts, attack_tokens >= 1, ddim_steps >= 2 and rounds, attack_steps >= 0")
        if self.preserve not in ("none", "retained"):
            raise UserError(f"uce_adv preserve must be none or retained, got {self.preserve!r}")


def adversarial_row(task, edited, original, concept: int, cfg: AdversarialUCEConfig, noise: NoiseSource,
                    device: torch.device) -> torch.Tensor:
    """``[1, D]``: the concept's last-word embedding after an adversarial prefix found against ``edited``."""
    encoders, prompt = task.text_encoders, task.prompts[concept]
    ids = task.prompt_tokens([prompt])[0][0]
    vocabulary = encoders[0].get_input_embeddings().weight.detach()
    start = vocabulary[torch.tensor([noise.shared_randint(len(vocabulary)) for _ in range(cfg.attack_tokens)])]
    label = torch.tensor([concept], device=device)
    timesteps_of = task.sampler(cfg.ddim_steps).timesteps

    def loss_of(prefix: torch.Tensor) -> torch.Tensor:
        steps, t = sampling_schedule(noise, cfg.ddim_steps, task.scheduler.config.num_train_timesteps, "compvis",
                                     timesteps_of, task.timestep_of_index)
        with torch.no_grad():
            noisy = partially_sampled(original, task, cfg.ddim_steps, label, steps, cfg.start_guidance)
            target = task.predict_noise(original, noisy, t.to(device).expand(1), label)
        inputs = task.model_inputs({"encoder_hidden_states": encode_with_prefix(task, encoders, ids, prefix)}, device)
        return (task.denoise(edited, noisy, t.to(device).expand(1), inputs).float() - target.float()).pow(2).mean()

    prefix, _ = accumulated_adam(start, loss_of, cfg.attack_steps, cfg.attack_lr)
    with torch.no_grad():
        encoded = encode_with_prefix(task, encoders, ids, prefix).float().cpu()[0]
    return encoded[last_word_index(task.tokenizers[0], prompt) + cfg.attack_tokens][None]


@register_method("uce_adv", "UCE with AdvUnlearn's adversarial prompts: rounds of attacks on the edit, each context "
                 "found erased in closed form, the retain prompts preserved (text-to-image; genunlearn's combination)",
                 AdversarialUCEConfig, kinds=("text-to-image",))
def run(task, split, cfg: AdversarialUCEConfig, accelerator, *, checkpoint_dir=None, resume=False) -> UnlearnResult:
    started = time.perf_counter()
    require_text_to_image(task, "uce_adv")
    require_single_clip(task, "uce_adv", "use uce, esd, salun or sfron")
    concepts = list(split.spec.classes)
    guide = task.anchor or ""
    preserved = [task.prompts[i] for i in (task.rl_prompts or [])] if cfg.preserve == "retained" else []
    edit = UCEConfig(lamb=cfg.lamb, erase_scale=cfg.erase_scale, preserve_scale=cfg.preserve_scale)
    rows, guides, kept = edit_rows(task, [task.prompts[i] for i in concepts], [guide] * len(concepts), preserved, "last")
    original = task.model.to(accelerator.device).eval()
    model = working_copy(task, accelerator).eval().requires_grad_(False)
    uce_edit(model, rows, guides, kept, edit)
    noise = NoiseSource(derive_seed(cfg.seed, "uce_adv attack"))
    with drawing_from(noise):
        for _ in range(cfg.rounds):  # every prompt attacked alike, then one edit of the original with all rows
            found = [adversarial_row(task, model, original, c, cfg, noise, accelerator.device)
                     for c in concepts for _ in range(cfg.contexts)]
            rows, guides = torch.cat([rows, *found]), torch.cat([guides, guides[:1].expand(len(found), -1)])
            model.load_state_dict(task.model.state_dict())
            uce_edit(model, rows, guides, kept, edit)
    info = {"concepts": [task.prompts[i] for i in concepts], "guide": guide, "preserved_prompts": len(preserved),
            "rounds": cfg.rounds, "adversarial_rows": len(rows) - len(concepts)}
    return UnlearnResult(model.requires_grad_(True), [], 0, time.perf_counter() - started, info)
