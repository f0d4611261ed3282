"""What a diffusion run is evaluated with (task, split, judge, FID references, sampling protocol), shared by the
forget and evaluate stages and by the forget-quality benchmark."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from genunlearn.advice import advise
from genunlearn.data.generated import generated_datasets
from genunlearn.data.split import ForgetSplit, check_ids, make_forget_split
from genunlearn.engine.fingerprint import model_fingerprint, tensors_fingerprint
from genunlearn.errors import UserError
from genunlearn.eval.generator_eval import (
    FidSetup,
    SamplingProtocol,
    fid_setup,
    generator_metrics,
    protocol_record,
    reference_features,
    reference_images,
)
from genunlearn.eval.judge import load_eval_classifier
from genunlearn.models.diffusion_loading import load_diffusion_pipeline, task_from_pipeline
from genunlearn.models.loading import EMBEDDED_DATASETS, load_datasets
from genunlearn.models.pipeline import Pipeline, pipeline_class_names, pipeline_num_classes
from genunlearn.models.presets import DiffusionPreset, SamplingDefaults
from genunlearn.models.sampling import pipeline_for
from genunlearn.models.checkpointing import enable_gradient_checkpointing
from genunlearn.precision import numerics
from genunlearn.runs.job import ForgetJob
from genunlearn.storage.cache import cache_root
from genunlearn.storage.files import atomic_save_tensors, atomic_write_text, read_cached_json, read_cached_tensors
from genunlearn.tasks.diffusion import DiffusionTask

GRID_SAMPLES = 8
EVALUATIONS = "evaluations"


def remain_count(job: ForgetJob, preset: DiffusionPreset) -> int | None:
    """How many other classes stand for the retain set: ``--remain-classes``, else the preset's (None: all)."""
    return preset.remain_classes if job.remain_classes is None else job.remain_classes


def remain_classes(num_classes: int, forgotten: list[int], count: int | None, seed: int) -> list[int]:
    """The other classes that stand for the retain set: all of them, or ``count`` chosen by ``seed``, sorted."""
    others = [c for c in range(num_classes) if c not in forgotten]
    if count is None or count >= len(others):
        return others
    if count < 1:
        raise UserError(f"--remain-classes must be at least 1, got {count}")
    order = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))
    return sorted(others[i] for i in order[:count].tolist())


def judge_name(job: ForgetJob, preset: DiffusionPreset) -> str:
    """The classifier that judges the samples: ``--eval-classifier``, else the preset's; a UserError for a user's
    model, which has no default judge."""
    name = job.eval_classifier or preset.eval_classifier
    if not name:
        raise UserError(f"{preset.name} has no default judge of its samples; pass --eval-classifier (a classifier of its "
                        "classes: a timm folder such as one save_classifier wrote, a classifier preset or YAML, or a timm "
                        "name with --eval-classifier-weights)")
    return name


UNRECOGNISED = 0.5  # the original's kept classes recognised less often than this: its figures say little


def check_recognised(metrics: dict, protocol: SamplingProtocol, judge: str, main_process: bool) -> None:
    """Warn when the judge recognises under half of the original model's samples of the kept classes: the sampling
    protocol (e.g. a family's guidance on a model trained for another) or the judge does not fit the model."""
    recognised = metrics.get("remain_acc")
    if recognised is not None and recognised < UNRECOGNISED:
        advise(f"{judge} recognises only {recognised:.0%} of the original model's samples of the kept classes (guidance "
               f"{protocol.guidance:g}, {protocol.steps} DDIM steps), so the run's figures will say little; sample as the "
               "model is meant to (--eval-guidance, --eval-steps) or pass a judge of its classes (--eval-classifier)",
               main_process)


def job_sampling(job: ForgetJob, sampling: SamplingDefaults) -> tuple[int, float, int]:
    """``(samples per class or prompt, guidance, DDIM steps)``: the job's evaluation settings, else the preset's
    ``sampling``; a UserError when out of range."""
    guidance = sampling.guidance if job.eval_guidance is None else job.eval_guidance
    steps = sampling.steps if job.eval_steps is None else job.eval_steps
    if job.eval_samples < 2 or steps < 1 or guidance < 0 or job.data_free_samples < 2:
        raise UserError(
            "--eval-samples and --data-free-samples must be at least 2, --eval-steps at least 1 and --eval-guidance non-negative"
        )
    return job.eval_samples, guidance, steps


def generated_data_id(model: torch.nn.Module, per_class: int, guidance: float, steps: int) -> str:
    """What a model's own training samples are a function of (the retrain oracle's data key)."""
    return f"generated-{model_fingerprint(model)}-{per_class}-guidance{guidance:g}-steps{steps}"


def sampling_protocol(job: ForgetJob, preset: DiffusionPreset) -> SamplingProtocol:
    """The evaluation's sampling protocol: the job's settings, else the preset's."""
    return SamplingProtocol(*job_sampling(job, preset.sampling), seed=job.seed)


def real_datasets(preset: DiffusionPreset, data: str | None) -> tuple | None:
    """``(train, test, data_id)`` of real images (``data``, or the embedded dataset), or None when there are none."""
    return load_datasets(preset, data) if (data is not None or preset.dataset in EMBEDDED_DATASETS) else None


def prepare_for_memory(task: DiffusionTask, gradient_checkpointing: bool) -> None:
    """Turn on the denoiser's gradient checkpointing (activations recomputed in backward: less memory, ~30% slower)."""
    if gradient_checkpointing:
        enable_gradient_checkpointing(task.model)


HELDOUT_SEED_OFFSET = 7  # held-out classes are drawn apart from the D_r classes


@dataclass
class DiffusionSetup:
    """Everything a diffusion run is evaluated with: the task and split, the pipeline that samples, the judge,
    the classes (forgotten, D_r's ``remaining``, ``heldout`` outside D_r) and their FID reference images and
    features per class."""

    pipeline: Pipeline
    task: DiffusionTask
    split: ForgetSplit
    forgotten: list[int]
    remaining: list[int]
    heldout: list[int]
    classifier: torch.nn.Module
    classifier_name: str
    fid: FidSetup
    protocol: SamplingProtocol
    reference: dict[int, torch.Tensor]
    features: dict[int, torch.Tensor]
    data_free: bool
    real: tuple | None

    def evaluate(self, model: torch.nn.Module, accelerator: Accelerator) -> tuple[dict, dict[int, torch.Tensor]]:
        """``generator_metrics``'s metrics and samples of ``model`` (a denoiser of this task)."""
        return generator_metrics(pipeline_for(self.task, model), self.classifier, self.forgotten, self.remaining, self.features,
                                  self.fid, self.protocol, accelerator, heldout=self.heldout)

    def protocol_record(self, mixed_precision: str) -> dict:
        return protocol_record(self.protocol, self.fid, self.classifier_name, self.forgotten + self.remaining, self.reference,
                               self.data_free, mixed_precision, heldout=self.heldout)


Evaluation = tuple[dict, dict[int, torch.Tensor]]  # (figures, the first GRID_SAMPLES samples per class or prompt)


def cached_evaluation(key: list, evaluate: Callable[[], Evaluation], root: Path, accelerator: Accelerator) -> Evaluation:
    """``evaluate()``'s figures and first ``GRID_SAMPLES`` samples per id, cached under ``root/evaluations`` by
    ``key`` (everything that decides them): the cells of a sweep and the reruns of a series share their "before"."""
    stem = root / EVALUATIONS / hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
    metrics_file, samples_file = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    metrics = read_cached_json(metrics_file, accelerator)
    stored = read_cached_tensors(samples_file, accelerator) if metrics is not None else None
    if stored is not None:
        return metrics, {int(c): images for c, images in stored.items()}
    metrics, samples = evaluate()
    samples = {c: images[:GRID_SAMPLES] for c, images in samples.items()}
    if accelerator.is_main_process:
        atomic_save_tensors({str(c): images for c, images in samples.items()}, samples_file)
        atomic_write_text(metrics_file, json.dumps(metrics))  # written last: it marks a finished entry
    return metrics, samples


def evaluate_original(setup: DiffusionSetup, accelerator: Accelerator, root: Path) -> Evaluation:
    """``setup.evaluate`` of the original model (``cached_evaluation``), keyed by weights, protocol, classes, judge,
    FID features and references, and numerics (device type, precision, TF32, draws)."""
    key = [model_fingerprint(setup.task.model), asdict(setup.protocol), setup.forgotten, setup.remaining, setup.heldout,
           setup.classifier_name, model_fingerprint(setup.classifier), setup.fid.describe(),
           tensors_fingerprint(setup.features), numerics(accelerator)]
    return cached_evaluation(key, lambda: setup.evaluate(setup.task.model, accelerator), root, accelerator)


def prepare_diffusion(job: ForgetJob, preset: DiffusionPreset, accelerator: Accelerator) -> DiffusionSetup:
    """Load ``job``'s pipeline, build its task and split (real data, or data-free: the pipeline's own samples,
    latents for latent models), the judge and the FID references.

    Data-free with fewer remain classes than the model has (a 1000-class model's D_r of 10), as many other classes
    are held out: sampled from the original model as their FID reference and scored apart after unlearning."""
    spec = job.split_spec()
    if spec.kind != "class":
        raise UserError("diffusion models forget whole classes; pass --class")
    protocol = sampling_protocol(job, preset)
    data_free = job.data_free or (job.data is None and preset.dataset not in EMBEDDED_DATASETS)
    real = real_datasets(preset, job.data)
    if real is not None:
        make_forget_split(real[0], real[1], spec)  # validates the class before anything heavy
    root = cache_root(job.cache_dir)
    pipeline = load_diffusion_pipeline(preset, pretrained=job.pretrained, data=real, cache_root=root, accelerator=accelerator)
    num_classes = pipeline_num_classes(pipeline)
    forgotten = list(spec.classes)
    check_ids(spec.classes, num_classes, "class")
    count = remain_count(job, preset)
    remaining = remain_classes(num_classes, forgotten, count, job.seed)
    heldout = remain_classes(num_classes, forgotten + remaining, count, job.seed + HELDOUT_SEED_OFFSET) if data_free else []
    heldout_set = None
    if data_free:
        latents = pipeline.vae is not None

        def generated(classes: list[int]):
            return generated_datasets(
                pipeline_for(pipeline), pipeline_class_names(pipeline), classes, job.data_free_samples, accelerator,
                guidance=protocol.guidance, steps=protocol.steps, seed=job.seed, cache_dir=root, latents=latents,
            )

        train, test = generated(forgotten + remaining)
        heldout_set = generated(heldout)[0] if heldout else None
        task = task_from_pipeline(preset, pipeline, train, test, cache_root=root, encoded_data=latents)
    else:
        task = task_from_pipeline(preset, pipeline, real[0], real[1], cache_root=root)
    split = make_forget_split(task.train_data, task.test_data, spec)
    prepare_for_memory(task, job.gradient_checkpointing)
    classifier_name = judge_name(job, preset)
    classifier = load_eval_classifier(classifier_name, weights=job.eval_classifier_weights, num_classes=num_classes,
                                      data=job.data, cache_dir=job.cache_dir, accelerator=accelerator)
    fid = fid_setup(job.fid_features, classifier, classifier_name, job.fid_library, job.fid_inception_weights, accelerator.device)
    reference = reference_images(task, split.retain, remaining)
    if heldout_set is not None:
        reference.update(reference_images(task, heldout_set, heldout))
    return DiffusionSetup(pipeline, task, split, forgotten, remaining, heldout, classifier, classifier_name, fid, protocol,
                          reference, reference_features(reference, fid), data_free, real)
