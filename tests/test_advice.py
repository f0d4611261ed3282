"""Warnings that name the fix (``genunlearn.advice``): each fires on a case that triggers it and stays silent on
the presets."""

from __future__ import annotations

import warnings

import pytest

import genunlearn as gu
from genunlearn.advice import UnlearningWarning
from genunlearn.eval.classify import mia_informative
from genunlearn.methods import METHODS
from genunlearn.methods.fast_ntk import check_trained_in_scope
from genunlearn.methods.registry import method_config
from genunlearn.models.presets import get_preset, list_presets


def advice_given(action) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = action()
    return [str(w.message) for w in caught if issubclass(w.category, UnlearningWarning)], result


def test_ssd_warns_when_alpha_is_outside_its_window_and_when_it_forgot_nothing(cnn_task, class3_split):
    """Class 3 is 10.2% of D, so α must stay below 1/share = 9.84: the reference's ResNet α = 10 cannot select the
    weights only the class uses and forgets nothing; α = 1 would select weights D uses as much as D_f."""
    for method in ("ssd", "lfssd"):
        messages, result = advice_given(lambda: gu.unlearn(cnn_task, class3_split, method, alpha=10.0))
        assert any("alpha=10 is at or above 1/share = 9.84" in m and "alpha=auto" in m for m in messages), messages
        assert any("forgot almost nothing: forget accuracy 1.000 ->" in m for m in messages), messages
    messages, _ = advice_given(lambda: gu.unlearn(cnn_task, class3_split, "ssd", alpha=0.9))
    assert any("alpha=0.9 <= 1 selects weights D uses as much as D_f" in m for m in messages), messages


def test_ssd_and_lfssd_at_the_presets_settings_give_no_advice(cnn_task, class3_split):
    for method in ("ssd", "lfssd"):
        messages, result = advice_given(lambda: gu.unlearn(cnn_task, class3_split, method))
        assert messages == [] and gu.evaluate_classifier(result.model, class3_split)["forget_acc"] <= 0.1


def test_ssd_alpha_auto_forgets_with_the_least_dampening_that_reaches_the_target(cnn_task, class3_split):
    """alpha=auto bisects α on a held-out slice of D_f (32 of class 3's 146): it forgets class 3 without the
    preset's hand-tuned α (8 and 5; auto finds 9.0 and 4.9: forget 0.075 and 0.000) and keeps D_r."""
    before = gu.evaluate_classifier(cnn_task.model, class3_split)
    for method in ("ssd", "lfssd"):
        messages, result = advice_given(lambda: gu.unlearn(cnn_task, class3_split, method, alpha="auto"))
        after = gu.evaluate_classifier(result.model, class3_split)
        assert messages == [] and result.info["auto_heldout_forget_acc"] == 0.0, (messages, result.info)
        assert after["forget_acc"] <= 0.1 and after["retain_acc"] >= before["retain_acc"] - 0.01, (method, after)
        assert 1.0 < result.info["alpha"] < 9.84
    with pytest.raises(gu.UserError, match="alpha must be a number or auto"):
        gu.unlearn(cnn_task, class3_split, "ssd", alpha="big")


def test_fast_ntk_warns_on_a_model_not_trained_in_its_scope_and_not_on_the_presets():
    for name in list_presets():
        preset = get_preset(name)
        if "fast_ntk" in preset.methods:
            scope = method_config("fast_ntk", preset, {})[1].scope
            assert advice_given(lambda: check_trained_in_scope(preset.peft, scope, True))[0] == [], name
    messages, _ = advice_given(lambda: check_trained_in_scope(None, "batchnorm+head", True))
    assert messages and "trained in all its weights" in messages[0] and "peft: batchnorm+head" in messages[0]
    assert advice_given(lambda: check_trained_in_scope("prompts+head", "batchnorm", True))[0]
    assert "fast_ntk" in METHODS


def test_a_degenerate_mia_is_reported_as_not_informative(cnn_task, class3_split):
    """Near 100% accuracy on both members and non-members leaves the attack nothing to learn: null and a warning.
    The cnn-digits preset (test accuracy below 99%) keeps its number and gives no advice."""
    messages, informative = advice_given(lambda: mia_informative(1.0, 0.995))
    assert not informative and "not informative" in messages[0] and "--compare-retrain" in messages[0]
    messages, metrics = advice_given(lambda: gu.evaluate_classifier(cnn_task.model, class3_split))
    assert messages == [] and 0.0 <= metrics["mia"] <= 1.0


def test_a_judge_that_does_not_recognise_the_originals_samples_is_reported():
    """ddpm-digits' own UNet sampled at its family's guidance 3 is recognised 22% of the time by cnn-digits (at its own
    guidance 1: 97%): the run says so before it spends its steps."""
    from genunlearn.eval.generator_eval import SamplingProtocol
    from genunlearn.kinds.diffusion_setup import check_recognised

    protocol = SamplingProtocol(100, 3.0, 100, seed=0)
    messages, _ = advice_given(lambda: check_recognised({"remain_acc": 0.216}, protocol, "my-judge", True))
    assert messages and "my-judge recognises only 22% of the original model's samples" in messages[0]
    assert "--eval-guidance" in messages[0]
    assert advice_given(lambda: check_recognised({"remain_acc": 0.97}, protocol, "cnn-digits", True))[0] == []
