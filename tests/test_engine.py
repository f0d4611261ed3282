"""The gradient-geometry engine's math on tiny models: Fishers, masks, fast-slow steps, objectives."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from genunlearn.data.tensor_dataset import LabeledTensorDataset
from genunlearn.engine.geometry import SlowWeights, cosine_decay, fast_slow_iteration, joint_iteration
from genunlearn.engine.loop import LoopConfig, StepContext
from genunlearn.engine.masks import ParameterMask, fisher_ratio_mask, top_fraction_mask
from genunlearn.engine.objectives import adaptive_gradient_ascent, adaptive_weights, random_other_labels
from genunlearn.engine.saliency import accumulate_gradients, cached_gradient_statistics
from genunlearn.errors import UserError
from genunlearn.noise import NoiseSource, current_noise, derive_seed
from helpers import accelerate_launch

REPO = Path(__file__).resolve().parents[1]


def regression_data(n: int = 5, seed: int = 0) -> LabeledTensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    targets = torch.randint(-3, 4, (n,), generator=generator)  # integer regression targets
    return LabeledTensorDataset(inputs, targets, ["y"])


def squared_loss(model: nn.Module, batch) -> torch.Tensor:
    inputs, targets = batch
    return (model(inputs).squeeze(-1) - targets.double()) ** 2


def linear_model(weights=(0.5, -1.0, 2.0)) -> nn.Linear:
    model = nn.Linear(3, 1, bias=False).double()
    model.weight.data = torch.tensor([weights], dtype=torch.float64)
    return model


def batch_gradient(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """By hand: ∇_w mean_i (w·x_i - y_i)^2 = (2/|b|) Σ_i (w·x_i - y_i) x_i."""
    return 2.0 / len(y) * ((x @ w - y.double())[:, None] * x).sum(0)


def test_fisher_equals_hand_computation(accelerator):
    data, model = regression_data(), linear_model()
    w = model.weight.detach()[0]
    batches = [slice(0, 2), slice(2, 4), slice(4, 5)]
    grads = [batch_gradient(w, data.images[b], data.targets[b]) for b in batches]
    fisher = accumulate_gradients(model, squared_loss, data, accelerator, batch_size=2)[0][0]
    assert torch.allclose(fisher, sum(g**2 for g in grads) / 3, atol=1e-12)
    magnitude = accumulate_gradients(model, squared_loss, data, accelerator, batch_size=2, transform="abs")[0][0]
    assert torch.allclose(magnitude, sum(g.abs() for g in grads) / 3, atol=1e-12)
    signed = accumulate_gradients(model, squared_loss, data, accelerator, batch_size=2, transform="identity")[0][0]
    assert torch.allclose(signed, sum(grads) / 3, atol=1e-12)
    clipped = accumulate_gradients(model, squared_loss, data, accelerator, batch_size=2, max_norm=0.1)[0][0]
    expected = sum((g * min(1.0, 0.1 / (g.norm() + 1e-6))) ** 2 for g in grads) / 3
    assert torch.allclose(clipped, expected, atol=1e-9)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())


def test_cycled_fisher_batches_are_full_and_reshuffled_each_pass(accelerator):
    """``batches``: that many full batches from the set cycled in a fresh seeded order per pass (a 5-sample set,
    batch 2, 4 batches: one pass and 3 samples of a second, reshuffled)."""
    data, model = regression_data(), linear_model()
    w = model.weight.detach()[0]
    order_seed = derive_seed(4, "fisher forget", "order")  # the order comes from the run's seed and the stream
    order = torch.cat([torch.randperm(5, generator=torch.Generator().manual_seed(derive_seed(order_seed, "epoch", epoch)))
                       for epoch in range(2)])
    members = [order[2 * b : 2 * b + 2] for b in range(4)]
    assert sorted(torch.cat(members[:2] + [members[2][:1]]).tolist()) == [0, 1, 2, 3, 4]  # every sample in the first pass
    grads = [batch_gradient(w, data.images[m], data.targets[m]) for m in members]
    fisher = accumulate_gradients(model, squared_loss, data, accelerator, batch_size=2, batches=4, seed=4,
                                  stream="fisher forget")[0][0]
    assert torch.allclose(fisher, sum(g**2 for g in grads) / 4, atol=1e-12)
    one_pass = accumulate_gradients(model, squared_loss, data, accelerator, batch_size=2)[0][0]
    assert not torch.allclose(fisher, one_pass)
    other_seed = accumulate_gradients(model, squared_loss, data, accelerator, batch_size=2, batches=4, seed=5,
                                      stream="fisher forget")[0][0]
    assert not torch.allclose(fisher, other_seed)


def noisy_loss(model: nn.Module, batch) -> torch.Tensor:
    """A loss that draws from ``current_noise`` as a diffusion loss does: the inputs perturbed by ε."""
    inputs, targets = batch
    noise = current_noise().randn(tuple(inputs.shape), inputs.device, inputs.dtype)
    return (model(inputs + noise).squeeze(-1) - targets.to(inputs.dtype)).pow(2)


def test_statistics_noise_follows_the_seed_and_the_stream(accelerator):
    """The noise of a statistic is the run's (seed, stream, batch): the same seed gives bit-identical Fishers, another
    seed other ones, and the forget and retain streams draw independently (not the same ε for batch b of each)."""
    data, model = regression_data(n=6), linear_model()
    fisher = lambda seed, stream: accumulate_gradients(model, noisy_loss, data, accelerator, batch_size=2, seed=seed,  # noqa: E731
                                                       stream=stream)[0]
    assert torch.equal(fisher(0, "fisher forget"), fisher(0, "fisher forget"))
    assert not torch.allclose(fisher(0, "fisher forget"), fisher(1, "fisher forget"))
    assert not torch.allclose(fisher(0, "fisher forget"), fisher(0, "fisher retain"))
    first_draws = {stream: NoiseSource(derive_seed(0, stream, "noise", 0)).randn((2, 3)) for stream in ("fisher forget", "fisher retain")}
    assert not torch.allclose(first_draws["fisher forget"], first_draws["fisher retain"])
    # by hand: batch b's ε is the stream's (seed, stream, "noise", b) CPU draw
    w = model.weight.detach()[0]
    by_hand = 0
    for b in range(3):
        x, y = data.images[2 * b : 2 * b + 2], data.targets[2 * b : 2 * b + 2]
        eps = NoiseSource(derive_seed(7, "fisher forget", "noise", b)).randn(tuple(x.shape), dtype=x.dtype)
        by_hand = by_hand + batch_gradient(w, x + eps, y) ** 2
    assert torch.allclose(fisher(7, "fisher forget")[0], by_hand / 3, atol=1e-12)


def test_fisher_cache_hits_only_for_the_same_key(accelerator, tmp_path):
    data, model = regression_data(), linear_model()
    first, hit1 = cached_gradient_statistics(tmp_path, model, squared_loss, "mse", data, accelerator, batch_size=2)
    again, hit2 = cached_gradient_statistics(tmp_path, model, squared_loss, "mse", data, accelerator, batch_size=2)
    other, hit3 = cached_gradient_statistics(tmp_path, model, squared_loss, "mse", data, accelerator, batch_size=3)
    cycled, hit5 = cached_gradient_statistics(tmp_path, model, squared_loss, "mse", data, accelerator, batch_size=2, batches=4)
    assert (hit1, hit2, hit3, hit5) == (False, True, False, False) and not torch.equal(first[0], cycled[0])
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])
    _, seeded = cached_gradient_statistics(tmp_path, model, squared_loss, "mse", data, accelerator, batch_size=2, seed=3)
    assert seeded  # one pass with no draws: every seed shares it
    model.weight.data += 1.0
    _, hit4 = cached_gradient_statistics(tmp_path, model, squared_loss, "mse", data, accelerator, batch_size=2)
    assert not hit4  # new weights, new key


def test_fisher_cache_key_names_seed_stream_device_precision_and_tf32(accelerator, tmp_path, monkeypatch):
    """A statistic that drew random numbers is cached per (seed, stream); every statistic per device type, mixed
    precision and TF32: changing any one of them misses."""
    data, model = regression_data(n=6), linear_model()

    def cached(**kwargs) -> bool:
        return cached_gradient_statistics(tmp_path, model, noisy_loss, "noisy", data, accelerator, batch_size=2,
                                          **{"seed": 0, "stream": "fisher forget", **kwargs})[1]

    from genunlearn import precision

    assert (cached(), cached()) == (False, True)
    assert not cached(seed=1) and not cached(stream="fisher retain")
    for field, value in (("device_type", "cuda"), ("mixed_precision", "bf16"), ("tf32", True)):  # (TF32 is moot on a CPU)
        original = precision.numerics
        monkeypatch.setattr("genunlearn.engine.saliency.numerics", lambda acc: {**original(acc), field: value})
        assert not cached()
        monkeypatch.undo()
    assert cached()


def test_masks_equal_their_formulas():
    forget = [torch.tensor([1.0, 2.0, 0.0, 5.0]), torch.tensor([[3.0]])]
    retain = [torch.tensor([1.0, 4.0, 0.0, 1.0]), torch.tensor([[6.0]])]
    mask = fisher_ratio_mask(["a", "b"], forget, retain, threshold=1.0)
    assert mask.keep[0].tolist() == [True, False, True, True] and mask.keep[1].tolist() == [[False]]
    assert fisher_ratio_mask(["a", "b"], forget, retain, threshold=3.0).keep[0].tolist() == [False, False, False, True]
    scores = [torch.randn(40, generator=torch.Generator().manual_seed(1)), torch.randn(3, 20, generator=torch.Generator().manual_seed(2))]
    top = top_fraction_mask(["a", "b"], scores, 0.25)
    kept = torch.cat([s.abs().flatten()[k.flatten()] for s, k in zip(scores, top.keep)])
    dropped = torch.cat([s.abs().flatten()[~k.flatten()] for s, k in zip(scores, top.keep)])
    assert kept.numel() == 25 and kept.min() > dropped.max()
    assert top.kept_fraction() == pytest.approx(0.25)
    restored = ParameterMask.from_state_dict(top.state_dict(), ["a", "b"])
    assert all(torch.equal(a, b) for a, b in zip(restored.keep, top.keep))


def test_adaptive_weights_and_objective():
    losses = torch.tensor([0.5, 1.0, 4.0])
    expected = losses**-0.5 / (losses**-0.5).sum()
    assert torch.allclose(adaptive_weights(losses, 0.5), expected, atol=1e-6)
    assert adaptive_weights(losses, 0.5)[0] > adaptive_weights(losses, 0.5)[2]  # low loss pushed hardest

    class Task:
        def loss(self, model, batch, labels=None):
            return losses.clone().requires_grad_()

    value = adaptive_gradient_ascent(Task(), None, None, 0.5)
    assert value.item() == pytest.approx(-(expected * losses).sum().item(), rel=1e-6)


def test_cosine_decay_and_slow_weights():
    assert cosine_decay(10.0, 0, 100) == 10.0 and cosine_decay(10.0, 50, 100) == pytest.approx(5.0)
    assert cosine_decay(10.0, 100, 100) == pytest.approx(0.0)
    param = nn.Parameter(torch.tensor([0.0, 2.0]))
    pull = SlowWeights(beta=0.25)
    pull.begin([param])
    param.data += 4.0
    pull.end([param])
    assert param.data.tolist() == [1.0, 3.0]  # 0.75 * start + 0.25 * end
    off = SlowWeights(beta=1.0)
    off.begin([param])
    param.data += 4.0
    off.end([param])
    assert param.data.tolist() == [5.0, 7.0]


class _Stream:
    def __init__(self, batch):
        self.batch = batch

    def next(self):
        return self.batch


def _context(model, accelerator, lr=0.1, momentum=0.0, weight_decay=0.0):
    cfg = LoopConfig(steps=1, lr=lr, momentum=momentum, weight_decay=weight_decay)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return StepContext(0, model, optimizer, accelerator, None, cfg, None, None)


def test_rl_other_labels_are_random_or_the_references_fixed_shift(accelerator):
    """rl's other label: by default a random other class per sample (several targets for one class); with
    rl_shift = k every sample of class c gets (c + k) mod K, as the DDPM references' (c_f + 1) mod 10."""
    ctx = _context(linear_model(), accelerator)
    labels = torch.full((200,), 8)
    drawn = random_other_labels(labels, 10, ctx)
    assert not (drawn == 8).any() and len(drawn.unique()) == 9
    ctx.cfg.rl_shift = 1
    assert torch.equal(random_other_labels(torch.tensor([8, 9, 0]), 10, ctx), torch.tensor([9, 0, 1]))
    ctx.cfg.rl_shift = 10
    with pytest.raises(UserError, match="maps every class onto itself"):
        random_other_labels(labels, 10, ctx)
    with pytest.raises(UserError, match="rl_shift must be at least 1"):
        LoopConfig(rl_shift=0)


def test_remain_gradient_is_taken_at_post_forget_weights(accelerator):
    forget_data, retain_data = regression_data(4, seed=1), regression_data(4, seed=2)
    xf, yf, xr, yr = forget_data.images, forget_data.targets, retain_data.images, retain_data.targets
    model = linear_model()
    mask = ParameterMask(["weight"], [torch.tensor([[True, False, True]])])
    w0 = model.weight.detach()[0].clone()
    ctx = _context(model, accelerator)
    fast_slow_iteration(
        ctx,
        lambda: -squared_loss(model, (xf, yf)).mean(),
        lambda: squared_loss(model, (xr, yr)).mean(),
        mask=mask, forget_clip=None, retain_clip=None,
    )
    keep = mask.keep[0][0].double()
    w1 = w0 + 0.1 * keep * batch_gradient(w0, xf, yf)
    w2 = w1 - 0.1 * batch_gradient(w1, xr, yr)
    assert torch.allclose(model.weight.detach()[0], w2, atol=1e-12)
    taken_at_start = w1 - 0.1 * batch_gradient(w0, xr, yr)
    assert not torch.allclose(w2, taken_at_start, atol=1e-6)

    joint_model = linear_model()
    joint_iteration(
        _context(joint_model, accelerator),
        lambda: -squared_loss(joint_model, (xf, yf)).mean(),
        lambda: squared_loss(joint_model, (xr, yr)).mean(),
        mask=mask, max_norm=None,
    )
    joint = w0 + 0.1 * keep * batch_gradient(w0, xf, yf) - 0.1 * batch_gradient(w0, xr, yr)
    assert torch.allclose(joint_model.weight.detach()[0], joint, atol=1e-12)


@pytest.mark.parametrize("hold", [False, True])
def test_a_mask_acts_on_the_gradient_and_holds_weights_only_when_asked(cnn_task, class3_split, accelerator, hold):
    """As the references' ``p.grad *= mask``: masked-out weights get no gradient, but momentum and weight decay still
    move them (exactly as a zero-gradient step would); ``hold_masked`` keeps them exactly (SalUn's classifier
    reference restores them)."""
    import copy

    model = copy.deepcopy(cnn_task.model).train()
    ctx = _context(model, accelerator, lr=0.05, momentum=0.9, weight_decay=5e-4)
    ctx.cfg.hold_masked = hold
    images = torch.stack([class3_split.retain[i][0] for i in range(32)])
    labels = torch.tensor([class3_split.retain[i][1] for i in range(32)])
    for _ in range(2):  # build up momentum so that an unguarded step would move every weight
        ctx.backward_step(cnn_task.loss(model, (images, labels)).mean())
    generator = torch.Generator().manual_seed(0)
    mask = ParameterMask([n for n, _ in model.named_parameters()], [torch.rand(p.shape, generator=generator) < 0.5 for p in model.parameters()])
    before = [p.detach().clone() for p in model.parameters()]
    # what a step with a zero gradient does (momentum 0.9, weight decay): v <- 0.9 v + wd θ, θ <- θ - lr v
    momentum = [ctx.optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    coasting = [θ - 0.05 * (0.9 * v + 5e-4 * θ) for θ, v in zip(before, momentum)]
    forget_images = torch.stack([class3_split.forget[i][0] for i in range(32)])
    forget_labels = torch.tensor([class3_split.forget[i][1] for i in range(32)])
    ctx.backward_step(-cnn_task.loss(model, (forget_images, forget_labels)).mean(), mask=mask, max_norm=7.0)
    for old, coasted, new, keep in zip(before, coasting, model.parameters(), mask.keep):
        expected = old[~keep] if hold else coasted[~keep]
        assert torch.allclose(expected, new.detach()[~keep], atol=1e-7, rtol=0)
        if hold:
            assert torch.equal(old[~keep], new.detach()[~keep])
    assert any(not torch.equal(old[keep], new.detach()[keep]) for old, new, keep in zip(before, model.parameters(), mask.keep))
    if not hold:
        assert any(not torch.equal(old[~keep], new.detach()[~keep]) for old, new, keep in zip(before, model.parameters(), mask.keep))


def test_fisher_from_two_processes_equals_one(cnn_task, class3_split, cache_dir, accelerator, tmp_path):
    out = tmp_path / "fisher2.safetensors"
    done = accelerate_launch(REPO / "tests" / "workers" / "fisher_dump.py", [str(out)], cache_dir, port=29519)
    assert done.returncode == 0, done.stderr[-2000:]
    two = load_file(str(out))
    one = accumulate_gradients(cnn_task.model, cnn_task.loss, class3_split.forget, accelerator, batch_size=32)
    cycled = accumulate_gradients(cnn_task.model, cnn_task.loss, class3_split.forget, accelerator, batch_size=32, batches=7)
    names = [n for n, _ in cnn_task.model.named_parameters()]
    assert math.ceil(len(class3_split.forget) / 32) % 2 == 1  # uneven batches per process are covered
    for name, expected, expected_cycled in zip(names, one, cycled):
        assert torch.allclose(two[name], expected, rtol=1e-4, atol=1e-10), name
        assert torch.allclose(two[f"cycled.{name}"], expected_cycled, rtol=1e-4, atol=1e-10), name
