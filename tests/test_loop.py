"""The shared loop: batch streams, schedules, non-finite guard, checkpoints and exact resume."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from genunlearn import UserError
from genunlearn.engine.batches import StepBatchSampler
from genunlearn.engine.checkpoint import checkpoints_newest_first
from genunlearn.engine.loop import LoopConfig, run_loop
from genunlearn.engine.training import supervised_step
from helpers import interrupted_at


def test_global_batch_is_the_same_for_any_process_count():
    single = StepBatchSampler(size=50, batch_size=8, seed=3)
    pair = [StepBatchSampler(size=50, batch_size=4, seed=3, rank=r, world=2) for r in (0, 1)]
    for step in range(20):
        assert single.indices(step) == pair[0].indices(step) + pair[1].indices(step)


def test_each_epoch_is_a_fresh_permutation_and_resume_continues_the_stream():
    sampler = StepBatchSampler(size=12, batch_size=4, seed=0)
    epochs = [sum((sampler.indices(s) for s in range(3 * e, 3 * e + 3)), []) for e in range(3)]
    assert all(sorted(epoch) == list(range(12)) for epoch in epochs)
    assert epochs[0] != epochs[1]
    resumed = iter(StepBatchSampler(size=12, batch_size=4, seed=0, start_batch=5))
    assert next(resumed) == sampler.indices(5)


def test_unshuffled_streams_cycle_the_dataset_in_its_own_order():
    """``shuffle: false``: every pass in the set's order, as the SD references' unshuffled, cycled loaders."""
    sampler = StepBatchSampler(size=5, batch_size=2, seed=0, shuffle=False)
    assert [sampler.indices(s) for s in range(5)] == [[0, 1], [2, 3], [4, 0], [1, 2], [3, 4]]
    pair = [StepBatchSampler(size=5, batch_size=1, seed=0, rank=r, world=2, shuffle=False) for r in (0, 1)]
    assert [pair[0].indices(s) + pair[1].indices(s) for s in range(5)] == [sampler.indices(s) for s in range(5)]


def test_cosine_schedule_and_bad_settings():
    cfg = LoopConfig(steps=10, lr=1.0, schedule="cosine")
    assert cfg.lr_at(0) == 1.0 and cfg.lr_at(5) == pytest.approx(0.5) and cfg.lr_at(10) == pytest.approx(0.0)
    for bad in ({"steps": 0}, {"lr": -1.0}, {"optimizer": "lbfgs"}, {"schedule": "step"}, {"batch_size": 0}):
        with pytest.raises(UserError):
            LoopConfig(**bad)


def _finetune(task, split, accelerator, cfg, checkpoint_dir=None, resume=False, step_fn=supervised_step):
    model = copy.deepcopy(task.model)
    return run_loop(model, task, step_fn, cfg, accelerator, retain_data=split.retain, checkpoint_dir=checkpoint_dir, resume=resume)


def test_resume_from_checkpoint_reaches_the_same_weights(cnn_task, class3_split, accelerator, tmp_path):
    cfg = LoopConfig(steps=12, batch_size=32, lr=0.05, checkpoint_every=5, log_every=3)
    straight = _finetune(cnn_task, class3_split, accelerator, cfg)

    with pytest.raises(KeyboardInterrupt):
        _finetune(cnn_task, class3_split, accelerator, cfg, checkpoint_dir=tmp_path, step_fn=interrupted_at(supervised_step, 8))
    assert [p.name for p in checkpoints_newest_first(tmp_path)] == ["checkpoint-5"]
    resumed = _finetune(cnn_task, class3_split, accelerator, cfg, checkpoint_dir=tmp_path, resume=True)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [e["step"] for e in resumed.log] == [3, 6, 9, 12]
    assert resumed.log[-1]["retain_loss"] == pytest.approx(straight.log[-1]["retain_loss"])


def test_non_finite_loss_stops_with_a_clear_error(cnn_task, class3_split, accelerator):
    def nan_step(ctx):
        images, labels = ctx.retain.next()
        ctx.backward_step(ctx.task.loss(ctx.model, (images * float("nan"), labels)).mean())
        return {}

    with pytest.raises(UserError, match="non-finite.*lower the learning rate"):
        _finetune(cnn_task, class3_split, accelerator, LoopConfig(steps=3), step_fn=nan_step)
    assert all(torch.isfinite(p).all() for p in cnn_task.model.parameters())


def test_a_truncated_latest_checkpoint_resumes_from_the_one_before(cnn_task, class3_split, accelerator, tmp_path, caplog):
    cfg = LoopConfig(steps=12, batch_size=32, lr=0.05, checkpoint_every=4, log_every=3)
    straight = _finetune(cnn_task, class3_split, accelerator, cfg)

    with pytest.raises(KeyboardInterrupt):
        _finetune(cnn_task, class3_split, accelerator, cfg, checkpoint_dir=tmp_path, step_fn=interrupted_at(supervised_step, 9))
    newest = checkpoints_newest_first(tmp_path)[0]
    assert newest.name == "checkpoint-8"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a write cut short
    with caplog.at_level("WARNING", logger="genunlearn"):  # genunlearn's logger: the console and run.log
        resumed = _finetune(cnn_task, class3_split, accelerator, cfg, checkpoint_dir=tmp_path, resume=True)
    assert f"checkpoint {newest} is unreadable (SafetensorError); resuming from the one before it" in caplog.text
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_weights_that_turn_non_finite_are_never_checkpointed(cnn_task, class3_split, accelerator, tmp_path):
    def poisons_at_step_3(ctx):
        out = supervised_step(ctx)
        if ctx.step == 2:
            with torch.no_grad():
                next(iter(ctx.model.parameters())).fill_(float("inf"))
        return out

    cfg = LoopConfig(steps=8, batch_size=32, lr=0.05, checkpoint_every=1, log_every=1)
    with pytest.raises(UserError, match="weights became non-finite by step 3"):
        _finetune(cnn_task, class3_split, accelerator, cfg, checkpoint_dir=tmp_path, step_fn=poisons_at_step_3)
    kept = checkpoints_newest_first(tmp_path)
    assert kept[0].name == "checkpoint-2"
    assert all(torch.isfinite(t).all() for t in load_file(str(kept[0] / "model.safetensors")).values())
