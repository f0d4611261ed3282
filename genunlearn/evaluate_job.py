"""``genunlearn evaluate``: measure a model as it is, without unlearning, with the same metrics and protocol as a
forget run (so an evaluation of an unlearned model and of its original can be compared figure by figure)."""

from __future__ import annotations

import json

import torch
from accelerate import Accelerator

import genunlearn
from genunlearn.data.split import check_ids, make_forget_split
from genunlearn.diffusion_job import GRID_SAMPLES, real_datasets, remain_classes, sampling_protocol
from genunlearn.distributed import make_accelerator
from genunlearn.errors import UserError
from genunlearn.eval.classify import evaluate_classifier, predict_logits
from genunlearn.eval.generator_eval import generator_metrics, fid_setup, protocol_record, reference_features, reference_images
from genunlearn.eval.grids import save_class_grid
from genunlearn.eval.report import SCHEMA_VERSION, render_evaluation
from genunlearn.job import ForgetJob
from genunlearn.storage.cache import cache_root
from genunlearn.models.diffusion_loading import load_diffusion_pipeline, task_from_pipeline
from genunlearn.models.eval_classifier import load_eval_classifier
from genunlearn.models.loading import load_datasets, load_network
from genunlearn.models.pipeline import pipeline_num_classes
from genunlearn.models.presets import ClassifierPreset, DiffusionPreset, get_preset
from genunlearn.storage.files import atomic_write_text

EVALUATION_FILE = "evaluation.json"
SAMPLES_FILE = "samples.png"


def has_target(job: ForgetJob) -> bool:
    """Whether the job names a forgotten part (then its figures are reported separately)."""
    return bool(job.classes or job.subclasses) or job.random_fraction is not None


def classifier_evaluation(job: ForgetJob, preset: ClassifierPreset, accelerator: Accelerator) -> dict:
    """Accuracy on all training and test images, test accuracy per class and, with a forgotten part, the forget
    run's metrics (forget/retain/test accuracy, MIA)."""
    train, test, data_id = load_datasets(preset, job.data)
    split = make_forget_split(train, test, job.split_spec()) if has_target(job) else None
    network = load_network(preset, train, data_id, pretrained=job.pretrained, cache_dir=job.cache_dir,
                           accelerator=accelerator).to(accelerator.device)
    metrics = {}
    for name, dataset in (("train_acc_all", train), ("test_acc_all", test)):
        logits, labels = predict_logits(network, dataset, accelerator)
        correct = logits.argmax(1) == labels
        metrics[name] = float(correct.double().mean())
        if name == "test_acc_all":
            metrics["per_class_acc"] = {str(c): float(correct[labels == c].double().mean())
                                        for c in range(len(train.classes)) if (labels == c).any()}
    if split is not None:
        metrics.update(evaluate_classifier(network, split, accelerator))
    return {"metrics": metrics, "data": data_id}


def diffusion_evaluation(job: ForgetJob, preset: DiffusionPreset, accelerator: Accelerator) -> tuple[dict, dict[int, torch.Tensor]]:
    """Sample every evaluated class under the protocol, judge the samples, and measure FID against real images
    (``--data`` or the embedded data; none without real images). ``--class`` marks the forgotten classes."""
    if job.subclasses or job.random_fraction is not None:
        raise UserError("diffusion models are evaluated per class; pass --class (or nothing)")
    protocol = sampling_protocol(job, preset)
    root = cache_root(job.cache_dir)
    real = real_datasets(preset, job.data)
    pipeline = load_diffusion_pipeline(preset, pretrained=job.pretrained, data=real, cache_root=root, accelerator=accelerator)
    num_classes = pipeline_num_classes(pipeline)
    forgotten = list(job.classes)
    if forgotten:
        check_ids(forgotten, num_classes, "class")
    remaining = remain_classes(num_classes, forgotten, job.remain_classes or preset.remain_classes, job.seed)
    classifier_name = job.eval_classifier or preset.eval_classifier
    classifier = load_eval_classifier(classifier_name, weights=job.eval_classifier_weights, num_classes=num_classes,
                                      data=job.data, cache_dir=job.cache_dir, accelerator=accelerator)
    fid = fid_setup(job.fid_features, classifier, classifier_name, job.fid_library, job.fid_inception_weights, accelerator.device)
    reference = None
    if real is not None:
        task = task_from_pipeline(preset, pipeline, real[0], real[1], cache_root=root)
        reference = reference_images(task, real[0], remaining)
    metrics, samples = generator_metrics(pipeline, classifier, forgotten, remaining,
                                          None if reference is None else reference_features(reference, fid), fid, protocol, accelerator)
    evaluation = protocol_record(protocol, fid, classifier_name, forgotten + remaining, reference, False, accelerator.mixed_precision)
    return {"metrics": metrics, "evaluation": evaluation}, samples


def run_evaluation(job: ForgetJob, accelerator: Accelerator | None = None) -> dict:
    """Evaluate ``job``'s model (method and unlearning settings are ignored) and write ``evaluation.json``,
    ``evaluation.md`` and, for diffusion models, ``samples.png`` (one row per class) to ``job.output_dir``."""
    out = job.output_dir
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; choose a new --output-dir")
    accelerator = accelerator or make_accelerator(mixed_precision=job.mixed_precision)
    preset = get_preset(job.model)
    samples = None
    if isinstance(preset, DiffusionPreset):
        entries, samples = diffusion_evaluation(job, preset, accelerator)
        kind = "diffusion"
    else:
        entries, kind = classifier_evaluation(job, preset, accelerator), "classifier"
    report = {"schema_version": SCHEMA_VERSION, "genunlearn_version": genunlearn.__version__, "kind": kind,
              "model": preset.name, "pretrained": job.pretrained, "class": job.forgotten(), "seed": job.seed,
              "processes": accelerator.num_processes, **entries}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if samples is not None:
            save_class_grid([samples[c][:GRID_SAMPLES] for c in sorted(samples)], out / SAMPLES_FILE)
        atomic_write_text(out / EVALUATION_FILE, json.dumps(report, indent=2))
        atomic_write_text(out / "evaluation.md", render_evaluation(report, SAMPLES_FILE if samples is not None else None))
    accelerator.wait_for_everyone()
    return report
