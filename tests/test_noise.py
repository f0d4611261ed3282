"""The randomness contract: every draw comes from a seeded CPU generator and is moved to the device, per purpose, the
same for any process count and after a resume."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from genunlearn.data.tensor_dataset import LabeledTensorDataset
from genunlearn.engine.loop import LoopConfig, run_loop, step_noise
from genunlearn.models.presets import DiffusionObjective, DiffusionPreset
from genunlearn.noise import NoiseSource, current_noise, derive_seed, drawing_from
from genunlearn.tasks.diffusion import DiffusionTask, antithetic_timesteps
from helpers import tiny_class_unet

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_a_draw_is_the_cpu_generators_moved_to_the_device(device):
    """What the device receives equals the seeded CPU generator's draw bit for bit, whatever the device's own
    generators hold."""
    torch.manual_seed(123)  # the global generators play no part
    drawn = NoiseSource(5).randn((4, 3, 8, 8), device)
    assert drawn.device.type == device
    expected = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    assert torch.equal(drawn.cpu(), expected)
    torch.manual_seed(999)
    assert torch.equal(NoiseSource(5).randn((4, 3, 8, 8), device).cpu(), expected)
    integers = NoiseSource(6).randint(1000, (7,), device)
    assert torch.equal(integers.cpu(), torch.randint(0, 1000, (7,), generator=torch.Generator().manual_seed(6)))
    assert NoiseSource(5).randn((2, 3), device, torch.float64).dtype == torch.float64


def test_each_process_gets_its_rows_of_the_global_batchs_draws():
    """Two processes with 3 samples each draw exactly what one process with all 6 draws, in a sequence of draws."""
    one = NoiseSource(11)
    whole = [one.randn((6, 2)), one.randint(10, (6,)), one.rand((6, 1)),
             one.per_sample(6, lambda n, g: antithetic_timesteps(n, 1000, g)), one.shared_randint(50)]
    for rank in (0, 1):
        source = NoiseSource(11, rank=rank, world=2)
        part = [source.randn((3, 2)), source.randint(10, (3,)), source.rand((3, 1)),
                source.per_sample(3, lambda n, g: antithetic_timesteps(n, 1000, g)), source.shared_randint(50)]
        rows = slice(3 * rank, 3 * rank + 3)
        for mine, everything in zip(part[:4], whole[:4]):
            assert torch.equal(mine, everything[rows])
        assert part[4] == whole[4]
    assert one.draws == 5


def test_seeds_derive_per_purpose():
    """Distinct purposes (and indices) give distinct 63-bit seeds; the same purpose the same seed."""
    seeds = {derive_seed(0, "fisher forget", "noise", 0), derive_seed(0, "fisher retain", "noise", 0),
             derive_seed(1, "fisher forget", "noise", 0), derive_seed(0, "fisher forget", "noise", 1), derive_seed(0, "loop", 0)}
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(3, "loop", 7) == derive_seed(3, "loop", 7)


def test_outside_a_source_draws_come_from_the_global_cpu_generator():
    torch.manual_seed(4)
    drawn = current_noise().randn((2, 5))
    torch.manual_seed(4)
    assert torch.equal(drawn, torch.randn(2, 5))
    with drawing_from(NoiseSource(4)) as source:
        assert current_noise() is source
    assert current_noise() is not source


def _diffusion_task(timesteps: str) -> DiffusionTask:
    data = LabeledTensorDataset(torch.rand(8, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), ["a", "b", "c"])
    preset = DiffusionPreset(name="tiny", architecture="unet", objective=DiffusionObjective(timesteps=timesteps))
    return DiffusionTask(preset, tiny_class_unet(3), DDPMScheduler(num_train_timesteps=1000), data, data)


@pytest.mark.parametrize("timesteps", ["antithetic", "uniform"])
def test_the_diffusion_loss_draws_its_noise_and_timesteps_from_the_current_source(timesteps):
    """The ε loss's x_t is the scheduler's noising of the batch with the source's CPU draws: label dropout, ε, then t."""
    task = _diffusion_task(timesteps)
    images, labels = task.train_data.images, task.train_data.targets
    seen = []
    task.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append((args[0].clone(), args[1].clone())),
                                         with_kwargs=True)
    with drawing_from(NoiseSource(21)):
        task.loss(task.model.train(), (images, labels))
    by_hand = NoiseSource(21)
    by_hand.rand((8,))  # label dropout
    eps = by_hand.randn((8, 1, 8, 8))
    t = by_hand.randint(1000, (8,)) if timesteps == "uniform" else by_hand.per_sample(
        8, lambda n, g: antithetic_timesteps(n, 1000, g))
    assert torch.equal(seen[0][1], t)
    assert torch.equal(seen[0][0], task.scheduler.add_noise(images, eps, t))


def test_loop_noise_is_per_step_and_process_count_free(accelerator):
    """A step's stream depends on (seed, step) only: two runs of one seed draw alike, another seed differently."""
    assert torch.equal(step_noise(0, 3, accelerator).randn((4,)), step_noise(0, 3, accelerator).randn((4,)))
    assert not torch.equal(step_noise(0, 3, accelerator).randn((4,)), step_noise(0, 4, accelerator).randn((4,)))
    assert not torch.equal(step_noise(0, 3, accelerator).randn((4,)), step_noise(1, 3, accelerator).randn((4,)))


def test_a_diffusion_run_is_bit_identical_for_one_seed_and_differs_for_another(accelerator):
    task = _diffusion_task("antithetic")

    def step(ctx):
        loss = ctx.task.loss(ctx.model, ctx.retain.next()).mean()
        ctx.backward_step(loss)
        return {"loss": loss.item()}

    def weights(seed: int) -> list[torch.Tensor]:
        model = tiny_class_unet(3)
        cfg = LoopConfig(steps=3, batch_size=4, lr=1e-3, optimizer="adam", weight_decay=0.0, seed=seed)
        return [p.detach() for p in run_loop(model, task, step, cfg, accelerator, retain_data=task.train_data).model.parameters()]

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
