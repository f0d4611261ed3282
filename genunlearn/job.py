"""The main job: load a model, build the split, evaluate, unlearn, evaluate, write the run folder."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from accelerate import Accelerator

import genunlearn
from genunlearn.data.split import ForgetSplit, SplitSpec, choose_split, make_forget_split
from genunlearn.distributed import make_accelerator
from genunlearn.errors import UserError
from genunlearn.eval.classify import accuracy, evaluate_classifier, predict_logits
from genunlearn.eval.relearn import oracle_gaps, relearn_curve, retrain_oracle
from genunlearn.eval.report import SCHEMA_VERSION, write_report
from genunlearn.eval.seeds import aggregate_reports, write_summary
from genunlearn.methods import UnlearnResult
from genunlearn.methods.registry import method_config
from genunlearn.storage.cache import cache_root
from genunlearn.models.loading import load_datasets, load_network
from genunlearn.eval.model_card import classifier_loading
from genunlearn.models.presets import ClassifierPreset, DiffusionPreset, Preset, get_preset
from genunlearn.storage.files import WEIGHTS_NAME, atomic_write_text, load_weights, save_model_dir
from genunlearn.storage.timm_folder import save_classifier
from genunlearn.tasks.classifier import ClassifierTask, build_classifier

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"


@dataclass
class ForgetJob:
    """One forgetting run. ``settings`` override the method's settings (after the preset's defaults)."""

    model: str
    method: str
    output_dir: Path
    classes: list[int] = field(default_factory=list)
    random_fraction: float | None = None
    subclasses: list[int] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    pretrained: str | None = None
    data: str | None = None
    cache_dir: str | None = None
    seed: int = 0
    resume: bool = False
    eval_samples: int = 100
    data_free: bool = False
    data_free_samples: int = 100
    eval_steps: int | None = None
    eval_guidance: float | None = None
    eval_classifier: str | None = None
    eval_classifier_weights: str | None = None
    remain_classes: int | None = None
    fid_features: str = "classifier"
    fid_library: str = "torchmetrics"
    fid_inception_weights: str | None = None
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    compare_retrain: bool = False
    relearn_steps: int = 0
    relearn_samples: int = 8
    relearn_lr: float | None = None

    def identity(self) -> dict:
        """What makes two runs the same run (everything but where caches live, whether to resume, and gradient
        checkpointing, which changes memory, not results)."""
        return {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(self).items()
            if k not in ("cache_dir", "resume", "output_dir", "gradient_checkpointing")
        }

    def split_spec(self) -> SplitSpec:
        return choose_split(self.classes, self.random_fraction, self.subclasses, self.seed,
                            ("--class", "--random-fraction", "--subclass"))

    def forgotten(self) -> int | list[int] | None:
        ids = self.classes or self.subclasses
        return None if not ids else ids[0] if len(ids) == 1 else list(ids)


def check_output_dir(job: ForgetJob) -> None:
    """Refuse to touch an output dir that holds anything but this job's unfinished run (resumable)."""
    out = job.output_dir
    if not out.exists() or not any(out.iterdir()):
        return
    run_file = out / RUN_FILE
    if not run_file.is_file():
        raise UserError(f"{out} is not empty and holds no genunlearn run; choose a new --output-dir")
    held = json.loads(run_file.read_text())
    if held != job.identity():
        differing = sorted(k for k in set(held) | set(job.identity()) if held.get(k) != job.identity().get(k))
        raise UserError(f"{out} holds a different run (differs in {', '.join(differing)}); choose another --output-dir")
    if (out / "report.json").is_file():
        raise UserError(f"{out} already holds this finished run; choose a new --output-dir to run it again")
    if not job.resume:
        raise UserError(f"{out} holds an unfinished run of this job; add --resume_from_checkpoint latest to continue it")


def run_report(kind: str, job: ForgetJob, preset: Preset, split: ForgetSplit, cfg, result: UnlearnResult,
               accelerator: Accelerator, **entries) -> dict:
    """The report's common keys (see ``genunlearn.eval.report``) followed by ``entries``."""
    return {
        "schema_version": SCHEMA_VERSION,
        "genunlearn_version": genunlearn.__version__,
        "kind": kind,
        "model": preset.name,
        "class": job.forgotten(),
        "method": job.method,
        "steps": result.steps,
        "wall_time_s": result.wall_time_s,
        "processes": accelerator.num_processes,
        "split": split.summary(),
        "config": dataclasses.asdict(cfg),
        "method_info": result.info,
        "log": result.log,
        **entries,
    }


def oracle_and_relearning(job: ForgetJob, task, split: ForgetSplit, data_id: str, unlearned, after: dict,
                          evaluate: Callable, measure: Callable, store: tuple[Callable, Callable, str],
                          accelerator: Accelerator) -> dict:
    """The report entries ``--compare-retrain`` and ``--relearn-steps`` ask for: the retrain oracle's metrics and
    the gaps to them (``oracle``, ``gap_to_oracle``), and relearning curves of the unlearned model and the
    oracle (``relearn``). ``store``: (save, load, marker file) for the cached oracle."""
    if not (job.compare_retrain or job.relearn_steps):
        return {}
    oracle = retrain_oracle(task, split, data_id, cache_root(job.cache_dir), accelerator, *store)
    entries = {}
    if job.compare_retrain:
        oracle_metrics = evaluate(oracle)
        entries.update(oracle=oracle_metrics, gap_to_oracle=oracle_gaps(after, oracle_metrics))
    if job.relearn_steps:
        entries["relearn"] = {
            "steps": job.relearn_steps,
            "samples": job.relearn_samples,
            "lr": task.preset.train.lr if job.relearn_lr is None else job.relearn_lr,
            **{name: relearn_curve(task, model, split, job.relearn_steps, measure, accelerator, samples=job.relearn_samples,
                                   seed=job.seed, lr=job.relearn_lr) for name, model in (("unlearned", unlearned), ("retrain", oracle))},
        }
    return entries


def run_forget_job(job: ForgetJob, accelerator: Accelerator | None = None) -> dict:
    """Run ``job`` and return its report (also written to ``job.output_dir`` by the main process)."""
    if job.mixed_precision not in (None, "no", "fp16", "bf16"):
        raise UserError(f"unknown --mixed-precision {job.mixed_precision!r}; use no, fp16 or bf16")
    if job.relearn_steps < 0 or job.relearn_samples < 1 or (job.relearn_lr is not None and job.relearn_lr <= 0):
        raise UserError("--relearn-steps must be non-negative, --relearn-samples at least 1 and --relearn-lr positive")
    accelerator = accelerator or make_accelerator(mixed_precision=job.mixed_precision)
    preset = get_preset(job.model)
    if isinstance(preset, DiffusionPreset):
        from genunlearn.diffusion_job import (
            run_diffusion_job,  # imported here: it builds on this module
        )

        return run_diffusion_job(job, preset, accelerator)
    if job.data_free:
        raise UserError("--data-free applies to diffusion models; classifiers forget from their training data")
    method, cfg = method_config(job.method, preset, {"seed": job.seed, **job.settings})
    spec = job.split_spec()
    check_output_dir(job)
    accelerator.wait_for_everyone()  # every process has checked before the main process writes run.json
    train, test, data_id = load_datasets(preset, job.data)
    split = make_forget_split(train, test, spec)
    network = load_network(preset, train, data_id, pretrained=job.pretrained, cache_dir=job.cache_dir, accelerator=accelerator)
    task = ClassifierTask(preset, network, train, test, cache_dir=cache_root(job.cache_dir))
    if job.gradient_checkpointing:
        task.model.set_grad_checkpointing(True)
    if accelerator.is_main_process:
        job.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(job.output_dir / RUN_FILE, json.dumps(job.identity(), indent=2))
    before = evaluate_classifier(task.model, split, accelerator)
    result = method.run(task, split, cfg, accelerator, checkpoint_dir=job.output_dir / CHECKPOINTS, resume=job.resume)
    after = evaluate_classifier(result.model, split, accelerator)

    def forget_accuracy(model) -> float:
        return accuracy(*predict_logits(model.to(accelerator.device), split.forget, accelerator))

    def load_oracle(folder: Path):
        oracle = build_classifier(preset, len(train.classes))
        load_weights(oracle, folder)
        return oracle.eval()

    def save_oracle(model, folder: Path) -> None:
        save_model_dir(model, {"preset": preset.to_dict(), "classes": train.classes, "retrained_without": split.summary()}, folder)

    extras = oracle_and_relearning(job, task, split, data_id, result.model, after, lambda m: evaluate_classifier(m, split, accelerator),
                                   forget_accuracy, (save_oracle, load_oracle, WEIGHTS_NAME), accelerator)
    report = run_report("classifier", job, preset, split, cfg, result, accelerator, before=before, after=after,
                        weights=f"{MODEL_DIR}/model.safetensors", **extras)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        loadable = save_run_classifier(result.model, preset, task.train_data.classes, job.output_dir / MODEL_DIR,
                                       {"preset": preset.to_dict(), "unlearned": job.identity()})
        write_report(job.output_dir, report, base_model=job.pretrained, loading=classifier_loading(loadable, preset, task.num_classes))
        shutil.rmtree(job.output_dir / CHECKPOINTS, ignore_errors=True)
    accelerator.wait_for_everyone()
    return report



def save_run_classifier(model, preset: ClassifierPreset, classes: list[str], folder: Path, metadata: dict) -> str:
    """``save_classifier`` with the preset's input size and [-1, 1] scaling (mean 0.5, std 0.5 on [0, 1] pixels)."""
    size = (preset.channels, preset.image_size, preset.image_size)
    return save_classifier(model, folder, classes, input_size=size, normalisation=(0.5, 0.5), metadata=metadata)


def finished_report(job: ForgetJob) -> dict | None:
    """The report of ``job`` if its output folder already holds it finished, else None."""
    run_file, report_file = job.output_dir / RUN_FILE, job.output_dir / "report.json"
    if run_file.is_file() and report_file.is_file() and json.loads(run_file.read_text()) == job.identity():
        return json.loads(report_file.read_text())
    return None


def run_seeds(job: ForgetJob, seeds: list[int], accelerator: Accelerator | None = None) -> dict:
    """Run ``job`` once per seed into ``output_dir/seed-<s>`` (finished seeds are reused, so a killed series
    continues) and write the mean ± std of every figure to ``output_dir/summary.{json,md}``; return the summary."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError("--seeds needs one or more distinct seeds, e.g. --seeds 0 1 2")
    accelerator = accelerator or make_accelerator(mixed_precision=job.mixed_precision)
    runs = [f"seed-{seed}" for seed in seeds]
    reports = []
    for seed, run in zip(seeds, runs):
        one = dataclasses.replace(job, seed=seed, output_dir=job.output_dir / run)
        reports.append(finished_report(one) or run_forget_job(one, accelerator))
    summary = aggregate_reports(reports, seeds, runs)
    if accelerator.is_main_process:
        write_summary(job.output_dir, summary)
    accelerator.wait_for_everyone()
    return summary
