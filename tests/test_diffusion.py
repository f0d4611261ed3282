"""Diffusion foundations on tiny models: ε loss, guidance with the null class, pipelines that round-trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTTransformer2DModel, UNet2DModel

from genunlearn import UserError
from genunlearn.data.tensor_dataset import LabeledTensorDataset
from genunlearn.storage.pipeline_folder import load_pipeline, save_pipeline
from genunlearn.models.pipeline import ClassConditionalPipeline
from genunlearn.engine.saliency import accumulate_gradients
from genunlearn.models.presets import DiffusionObjective, DiffusionPreset, get_preset
from genunlearn.tasks.diffusion import DiffusionTask, build_denoiser
from helpers import tiny_class_unet

NUM_CLASSES = 3


def tiny_dit(in_channels: int = 1, learned_sigma: bool = False, sample_size: int = 8) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=in_channels,
        out_channels=2 * in_channels if learned_sigma else in_channels, num_layers=2, sample_size=sample_size,
        patch_size=2, num_embeds_ada_norm=NUM_CLASSES,
    )


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4, sample_size=8,
    )


def pipeline(denoiser, vae=None) -> ClassConditionalPipeline:
    return ClassConditionalPipeline(denoiser, DDIMScheduler(num_train_timesteps=1000), vae=vae, num_classes=NUM_CLASSES)


def sample(pipe, seed=0, guidance=2.0):
    return pipe([0, 1, 2, 1], guidance_scale=guidance, num_inference_steps=4, generator=torch.Generator().manual_seed(seed),
                output_type="pt").images


@pytest.mark.parametrize("build", [lambda: pipeline(tiny_class_unet(NUM_CLASSES)), lambda: pipeline(tiny_dit()), lambda: pipeline(tiny_dit(2, True, 4), tiny_vae())],
                         ids=["unet-pixel", "dit-pixel", "dit-latent-vae"])
def test_saved_pipeline_reproduces_samples_bit_for_bit(build, tmp_path):
    original = build()
    images = sample(original)
    assert images.shape == (4, 1, 8, 8) and images.min() >= 0.0 and images.max() <= 1.0  # diffusers' "pt": [0, 1]
    save_pipeline(original, tmp_path / "pipe")
    reloaded = load_pipeline(tmp_path / "pipe")
    assert type(reloaded.denoiser) is type(original.denoiser)
    assert torch.equal(sample(reloaded), images)
    assert not torch.equal(sample(reloaded, seed=1), images)


def test_guidance_uses_the_null_class():
    pipe = pipeline(tiny_class_unet(NUM_CLASSES))
    seen = []
    pipe.denoiser.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["class_labels"].tolist()), with_kwargs=True)
    sample(pipe, guidance=3.0)
    assert seen[0] == [0, 1, 2, 1, NUM_CLASSES, NUM_CLASSES, NUM_CLASSES, NUM_CLASSES]
    seen.clear()
    sample(pipe, guidance=1.0)  # plain conditional sampling: one pass, no null class
    assert seen[0] == [0, 1, 2, 1]


def _task(denoiser, vae=None) -> DiffusionTask:
    data = LabeledTensorDataset(torch.rand(6, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2]), ["a", "b", "c"])
    preset = DiffusionPreset(name="tiny", architecture="unet" if isinstance(denoiser, UNet2DModel) else "dit")
    return DiffusionTask(preset, denoiser, DDPMScheduler(num_train_timesteps=1000), data, data, vae=vae)


@pytest.mark.parametrize("make", [lambda: _task(tiny_class_unet(NUM_CLASSES)), lambda: _task(tiny_dit(learned_sigma=True)), lambda: _task(tiny_dit(2, True, 4), tiny_vae())],
                         ids=["unet", "dit-learned-sigma", "dit-latent"])
def test_epsilon_loss_is_per_sample_and_differentiable(make):
    task = make()
    images = torch.stack([task.train_data[i][0] for i in range(6)])
    labels = task.train_data.targets
    torch.manual_seed(0)
    losses = task.loss(task.model, (images, labels))
    assert losses.shape == (6,) and torch.isfinite(losses).all() and (losses > 0).all()
    losses.mean().backward()
    assert all(p.grad is not None for p in task.model.parameters() if p.requires_grad)
    torch.manual_seed(0)
    other = task.loss(task.model, (images, labels), labels=(labels + 1) % NUM_CLASSES)
    assert not torch.allclose(losses, other)  # the labels condition the prediction


def test_unet_training_loss_drops_labels_to_null():
    task = _task(tiny_class_unet(NUM_CLASSES))
    seen = []
    task.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["class_labels"]), with_kwargs=True)
    images = torch.zeros(4000, 1, 8, 8)
    task.training_loss(task.model.train(), (images, torch.zeros(4000, dtype=torch.long)))
    assert (seen[0] == NUM_CLASSES).float().mean().item() == pytest.approx(0.1, abs=0.02)


def test_presets_and_bad_pipeline_folder(tmp_path):
    preset = get_preset("ddpm-digits")
    assert isinstance(preset, DiffusionPreset) and preset.architecture == "unet"
    denoiser = build_denoiser(preset, 10)
    assert denoiser.class_embedding.num_embeddings == 11
    (tmp_path / "weights").mkdir()
    with pytest.raises(UserError, match="not a diffusion pipeline folder"):
        load_pipeline(tmp_path / "weights")


def tiny_digits_preset() -> DiffusionPreset:
    return DiffusionPreset.from_dict({
        "name": "tiny-ddpm", "architecture": "unet", "description": "test",
        "model_args": {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
                       "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D"],
                       "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4},
        "train": {"epochs": 1, "batch_size": 128, "lr": 1e-3, "optimizer": "adamw", "weight_decay": 0.0},
        "sampling": {"steps": 4, "guidance": 1.0},
    })


def test_pretraining_is_cached_and_reloaded(accelerator, tmp_path):
    from genunlearn.data.digits import load_digits_split
    from genunlearn.models.diffusion_loading import load_diffusion_task
    from genunlearn.models.sampling import pipeline_for

    train, test = load_digits_split()
    first = load_diffusion_task(tiny_digits_preset(), train, test, "digits8", pretrained=None, cache_root=tmp_path, accelerator=accelerator)
    entries = list((tmp_path / "models").iterdir())
    assert len(entries) == 1 and (entries[0] / "model_index.json").is_file()
    again = load_diffusion_task(tiny_digits_preset(), train, test, "digits8", pretrained=None, cache_root=tmp_path, accelerator=accelerator)
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))
    assert torch.equal(sample(pipeline_for(first)), sample(pipeline_for(again)))
    fresh = build_denoiser(tiny_digits_preset(), 10)
    assert not all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), fresh.state_dict().values()))


def test_generated_class_metrics_are_seeded_per_class(accelerator):
    from genunlearn.eval.generative import classify_generated
    from genunlearn.models.sampling import generate_class

    pipe = pipeline(tiny_class_unet(NUM_CLASSES))
    pipe.set_progress_bar_config(disable=True)
    one = generate_class(pipe, 1, 3, guidance=1.0, steps=3, seed=5)
    assert torch.equal(one, generate_class(pipe, 1, 3, guidance=1.0, steps=3, seed=5))
    assert not torch.equal(one, generate_class(pipe, 2, 3, guidance=1.0, steps=3, seed=5))

    class AlwaysClassOne(torch.nn.Module):
        def forward(self, images):
            return torch.tensor([[0.0, 5.0, 0.0]]).repeat(len(images), 1)

    metrics = classify_generated(pipe, AlwaysClassOne(), [0, 1, 2], 2, accelerator, guidance=1.0, steps=2)
    assert metrics[1]["accuracy"] == 1.0 and metrics[0]["accuracy"] == metrics[2]["accuracy"] == 0.0
    p = torch.softmax(torch.tensor([0.0, 5.0, 0.0]), 0)
    assert metrics[1]["probability"] == pytest.approx(float(p[1]), rel=1e-6)
    assert metrics[0]["entropy"] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["ddpm-digits", "dit-digits"])
def test_digits_diffusion_presets_draw_every_class(preset, cache_dir, accelerator):
    """The preset's full pretraining (about 4.5 and 5.5 min on 2 cores): each class's samples are recognised."""
    from genunlearn import load_task
    from genunlearn.eval.generative import classify_generated
    from genunlearn.models.sampling import pipeline_for

    task = load_task(preset, accelerator=accelerator)
    classifier = load_task("cnn-digits", accelerator=accelerator).model
    metrics = classify_generated(pipeline_for(task), classifier, list(range(10)), 50, accelerator, guidance=1.0, steps=50)
    accuracies = [m["accuracy"] for m in metrics.values()]
    assert min(accuracies) >= 0.8 and sum(accuracies) / len(accuracies) >= 0.9


def test_random_label_forms():
    """eps_match pulls ε_θ(x_t, t, c_f) onto the stop-gradient prediction for c'; relabel is the plain ε loss with c'."""
    task = _task(tiny_class_unet(NUM_CLASSES))
    images, labels = torch.stack([task.train_data[i][0] for i in range(6)]), task.train_data.targets
    other = (labels + 1) % NUM_CLASSES
    torch.manual_seed(3)
    relabel = task.random_label_loss(task.model, (images, labels), other, form="relabel")
    torch.manual_seed(3)
    assert torch.equal(relabel, task.loss(task.model, (images, other)))
    torch.manual_seed(3)
    matched = task.random_label_loss(task.model, (images, labels), other)
    torch.manual_seed(3)
    noisy, _, t = task._noised(images, task.preset.objective.timesteps)
    expected = (task.predict_noise(task.model, noisy, t, labels) - task.predict_noise(task.model, noisy, t, other)).pow(2).mean((1, 2, 3))
    assert torch.allclose(matched, expected) and (matched > 0).all()
    torch.manual_seed(3)
    assert torch.equal(task.random_label_loss(task.model, (images, labels), labels), torch.zeros(6))  # c' = c_f: nothing to match
    with pytest.raises(UserError, match="unknown rl_form"):
        task.random_label_loss(task.model, (images, labels), other, form="swap")


def test_salun_joint_step_is_rl_plus_small_retain_clipped_then_masked(accelerator):
    """SalUn's diffusion step: one update on rl(D_f) + 1e-3 L(D_r); weights outside the saliency mask never move. With
    ``epochs``, as the SD reference: that many passes over D_f, one step per forget batch."""
    from genunlearn.data.split import SplitSpec, make_forget_split
    from genunlearn.methods.registry import method_config

    task = _task(tiny_class_unet(NUM_CLASSES))
    split = make_forget_split(task.train_data, task.test_data, SplitSpec("class", classes=(0,)))
    spec, cfg = method_config("salun", task.preset, {"form": "joint", "steps": 3, "batch_size": 2, "optimizer": "adam",
                                                       "lr": 1e-2, "weight_decay": 0.0, "clip_grad_norm": 1.0, "mask_fraction": 0.3})
    assert cfg.retain_weight == 1e-3
    result = spec.run(task, split, cfg, accelerator, checkpoint_dir=None, resume=False)
    assert result.steps == 3 and {"forget_rl_loss", "retain_loss", "grad_norm"} <= set(result.log[-1])
    before, after = list(task.model.parameters()), list(result.model.parameters())
    moved = sum(int((a != b).sum()) for a, b in zip(after, before))
    assert 0 < moved <= 0.3 * sum(p.numel() for p in before) + 1
    _, by_epochs = method_config("salun", task.preset, {"form": "joint", "epochs": 3, "batch_size": 1, "optimizer": "adam",
                                                        "lr": 1e-2, "weight_decay": 0.0, "mask_fraction": 0.3})
    assert spec.run(task, split, by_epochs, accelerator, checkpoint_dir=None, resume=False).steps == 3 * len(split.forget)
    with pytest.raises(UserError, match="unknown SalUn form"):
        method_config("salun", task.preset, {"form": "both"})


@pytest.mark.parametrize("scheme", ["antithetic", "uniform"])
def test_unlearning_losses_draw_timesteps_as_the_preset_reference(scheme):
    """The DDPM references draw every unlearning batch's timesteps antithetically (B//2+1 uniform, then T-1-t of them,
    one per sample) in both steps, rl and the Fishers; DiT's draw them uniformly. Pretraining stays uniform."""
    task = _objective_task(tiny_class_unet(NUM_CLASSES), timesteps=scheme)
    seen = []
    task.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[1].clone()), with_kwargs=True)
    images, labels = torch.zeros(7, 1, 8, 8), torch.zeros(7, dtype=torch.long)
    task.loss(task.model.train(), (images, labels))
    task.random_label_loss(task.model, (images, labels), labels + 1)
    task.importance_loss(task.model.eval(), (images, labels))
    assert len(seen) == 5  # loss, rl target and prediction, importance conditional and unconditional
    for t in seen:
        assert len(t) == 7 and torch.equal(t[4:7] + t[0:3] == 999, torch.full((3,), scheme == "antithetic"))
    seen.clear()
    task.training_loss(task.model.train(), (images, labels))
    assert not torch.equal(seen[0][4:7], 999 - seen[0][0:3])


def _objective_task(denoiser, **objective) -> DiffusionTask:
    task = _task(denoiser)
    task.preset = dataclasses.replace(task.preset, objective=DiffusionObjective(**objective))
    return task


def test_retain_loss_is_summed_as_the_ddpm_references_so_salun_beta_weighs_c_h_w_times_more():
    """The DDPM references sum the ε error over C·H·W while SalUn's rl term is nn.MSELoss (an element mean), so
    SalUn's β = 1e-3 weighs the retain term β·C·H·W against rl; a ``mean`` preset (DiT's mean_flat) averages."""
    summed, averaged = _objective_task(tiny_class_unet(NUM_CLASSES), reduction="sum"), _objective_task(tiny_class_unet(NUM_CLASSES), reduction="mean")
    averaged.model.load_state_dict(summed.model.state_dict())
    images, labels = torch.rand(5, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0, 1])
    losses = []
    for task in (summed, averaged):
        torch.manual_seed(3)
        losses.append(task.loss(task.model.eval(), (images, labels)))
    assert torch.allclose(losses[0], 1 * 8 * 8 * losses[1], rtol=1e-5)
    torch.manual_seed(3)  # rl stays an element mean whatever the reduction: its scale is C·H·W times smaller
    noisy, _, t = summed._noised(images, "antithetic")
    with torch.no_grad():
        target = summed.predict_noise(summed.model, noisy, t, (labels + 1) % 3)
    expected = (summed.predict_noise(summed.model, noisy, t, labels) - target).pow(2).mean(dim=(1, 2, 3))
    torch.manual_seed(3)
    assert torch.allclose(summed.random_label_loss(summed.model, (images, labels), (labels + 1) % 3), expected)


@pytest.mark.parametrize("architecture", ["unet", "dit"])
def test_unlearning_losses_drop_labels_in_training_mode(architecture):
    """The DDPM references drop labels with p = 0.1 in both SFR-on steps and in both rl passes, the DiT reference once
    per sample in training mode: here both to the null class, drawn from the step's noise; eval: never."""
    task = _task(tiny_class_unet(NUM_CLASSES) if architecture == "unet" else tiny_dit())
    seen = []
    task.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["class_labels"]), with_kwargs=True)
    images, labels = torch.zeros(4000, 1, 8, 8), torch.zeros(4000, dtype=torch.long)
    task.loss(task.model.train(), (images, labels))
    task.random_label_loss(task.model, (images, labels), labels + 1)
    for passed in seen:  # the loss, then rl's target and prediction passes, each with its own draw
        assert (passed == NUM_CLASSES).float().mean().item() == pytest.approx(0.1, abs=0.02)
    assert not torch.equal(seen[1], seen[2])
    seen.clear()
    task.loss(task.model.eval(), (images, labels))
    assert not (seen[0] == NUM_CLASSES).any()


def test_a_dit_drops_a_label_once_for_every_block():
    """diffusers' DiT gives each block its own label embedding, each dropping labels on the device's generator in
    training mode; the task drops them itself (``conditioning``), so a DiT's prediction in training mode is its eval-mode
    prediction for the labels the task passes."""
    task = _task(tiny_dit())
    images, labels = torch.rand(64, 1, 8, 8), torch.randint(0, NUM_CLASSES, (64,))
    t = torch.randint(0, 1000, (64,))
    in_training = task.predict_noise(task.model.train(), images, t, labels)
    assert task.model.training  # the embedders' mode is restored
    assert torch.equal(in_training, task.predict_noise(task.model.eval(), images, t, labels))
    task.model.train()
    torch.manual_seed(0)
    unguarded = task.model(images, t, class_labels=labels).sample  # diffusers' own dropout, per block
    assert not torch.equal(unguarded, in_training)


def test_importance_loss_follows_the_preset_reference():
    """DDPM references: guided ε (s = 3) at antithetic t and T-1-t, summed; SFR-on's DiT: the plain conditional ε at
    uniform t, averaged (mean_flat). Both written out by hand with the same draws."""
    images, labels = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2])
    ddpm = _objective_task(tiny_class_unet(NUM_CLASSES))
    model = ddpm.model.eval()
    torch.manual_seed(5)
    noise = torch.randn(3, 1, 8, 8)
    first = torch.randint(0, 1000, (2,))
    t = torch.cat([first, 999 - first])[:3]  # one timestep per sample, paired across the batch
    noisy = ddpm.scheduler.add_noise(images, noise, t)
    conditional = ddpm.predict_noise(model, noisy, t, labels)
    unconditional = ddpm.predict_noise(model, noisy, t, torch.full((3,), NUM_CLASSES))
    guided = unconditional + 3.0 * (conditional - unconditional)
    expected = (guided - noise).pow(2).sum(dim=(1, 2, 3))
    torch.manual_seed(5)
    assert torch.allclose(ddpm.importance_loss(model, (images, labels)), expected, rtol=1e-5)
    dit = _objective_task(tiny_dit(), reduction="mean", importance_guidance=1.0, timesteps="uniform")
    model = dit.model.eval()
    torch.manual_seed(5)
    noise = torch.randn(3, 1, 8, 8)
    t = torch.randint(0, 1000, (3,))
    expected = (dit.predict_noise(model, dit.scheduler.add_noise(images, noise, t), t, labels) - noise).pow(2).mean(dim=(1, 2, 3))
    torch.manual_seed(5)
    assert torch.allclose(dit.importance_loss(model, (images, labels)), expected, rtol=1e-5)
    assert ddpm.importance_loss_id != dit.importance_loss_id  # cached Fishers of one never stand in for the other


def test_clipped_fisher_batches_are_norm_normalised(accelerator):
    """With the DDPM reference's per-batch clip at 1.0 on the summed loss, every batch gradient has norm 1 before it is
    squared, so the Fisher's entries sum to exactly 1 (γ = 1 is then scale-free)."""
    task = _objective_task(tiny_class_unet(NUM_CLASSES))
    fisher = accumulate_gradients(task.model, task.importance_loss, task.train_data, accelerator, batch_size=2, max_norm=1.0)
    assert sum(float(f.sum()) for f in fisher) == pytest.approx(1.0, rel=1e-5)
    unclipped = accumulate_gradients(task.model, task.importance_loss, task.train_data, accelerator, batch_size=2)
    assert sum(float(f.sum()) for f in unclipped) > 1.0  # the clip binds: summed-loss gradients are larger


def test_sfron_forget_and_retain_steps_have_the_clip_norm_when_it_binds(accelerator):
    """SFR-on's DDPM steps: both the fast (forget) and the slow (retain) step are clipped at 1.0; on the summed loss
    the clip binds, so with plain SGD at lr 1 each step moves the weights by exactly 1 (the reference's balance)."""
    from genunlearn.data.split import SplitSpec, make_forget_split
    from genunlearn.methods.registry import method_config

    task = _objective_task(tiny_class_unet(NUM_CLASSES))
    split = make_forget_split(task.train_data, task.test_data, SplitSpec("class", classes=(0,)))
    spec, cfg = method_config("sfron", task.preset, {"steps": 1, "batch_size": 2, "optimizer": "sgd", "momentum": 0.0,
                                                      "weight_decay": 0.0, "lr": 1.0, "forget_every": 1, "use_mask": False,
                                                      "forget_clip": 1.0, "retain_clip": 1.0, "forget_objective": "ga",
                                                      "forget_weight": 1.0, "decay_forget_weight": False})
    snapshots = []
    loss = task.loss

    def recording_loss(model, batch, labels=None):
        snapshots.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
        return loss(model, batch, labels)

    task.loss = recording_loss
    result = spec.run(task, split, cfg, accelerator, checkpoint_dir=None, resume=False)
    final = torch.cat([p.detach().flatten() for p in result.model.parameters()])
    assert len(snapshots) == 2  # the forget loss at θ0, the retain loss at θ1 (after the forget step)
    assert result.log[-1]["forget_grad_norm"] > 1.0 and result.log[-1]["retain_grad_norm"] > 1.0
    assert float((snapshots[1] - snapshots[0]).norm()) == pytest.approx(1.0, rel=1e-4)
    assert float((final - snapshots[1]).norm()) == pytest.approx(1.0, rel=1e-4)
