"""The diffusion kind: a class-conditional denoiser sampled through a pipeline, measured by a judge and FID."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from torch import nn

from genunlearn.data.folders import image_folder_splits
from genunlearn.data.split import check_ids
from genunlearn.errors import UserError
from genunlearn.eval.generative import classify_generated
from genunlearn.eval.generator_eval import (
    fid_setup,
    forget_sample_accuracy,
    generator_metrics,
    protocol_record,
    reference_features,
    reference_images,
)
from genunlearn.eval.grids import SAMPLES_FILE, save_samples_figure
from genunlearn.eval.judge import load_eval_classifier
from genunlearn.eval.model_card import diffusion_loading
from genunlearn.kinds.base import PIPELINE_DIR, GeneratorRun, OracleStore
from genunlearn.kinds.diffusion_setup import (
    GRID_SAMPLES,
    DiffusionSetup,
    check_recognised,
    evaluate_original,
    generated_data_id,
    judge_name,
    prepare_diffusion,
    real_datasets,
    remain_classes,
    remain_count,
    sampling_protocol,
)
from genunlearn.models.diffusion_loading import load_diffusion_pipeline, load_diffusion_task, task_from_pipeline
from genunlearn.models.loading import load_classifier_task, load_datasets
from genunlearn.models.pipeline import pipeline_class_names, pipeline_denoiser, pipeline_num_classes
from genunlearn.models.presets import DiffusionPreset, get_preset
from genunlearn.models.sampling import pipeline_for
from genunlearn.runs.job import ForgetJob
from genunlearn.storage.cache import cache_root
from genunlearn.storage.pipeline_folder import PIPELINE_CODE, load_pipeline, save_pipeline
from genunlearn.tasks.diffusion import DiffusionTask

Samples = dict[int, torch.Tensor]


class DiffusionRun(GeneratorRun):
    setup: DiffusionSetup

    @property
    def data_id(self) -> str:
        """The retrain oracle's data: the real data's id, or (data-free) the model's own samples."""
        if not self.setup.data_free:
            return self.setup.real[2]
        protocol = self.setup.protocol
        return generated_data_id(self.task.model, self.job.data_free_samples, protocol.guidance, protocol.steps)

    def evaluate_before(self) -> tuple[dict, Samples]:
        figures, samples = evaluate_original(self.setup, self.accelerator, cache_root(self.job.cache_dir))
        check_recognised(figures, self.setup.protocol, self.setup.classifier_name, self.accelerator.is_main_process)
        return figures, samples

    def evaluate(self, model: nn.Module) -> tuple[dict, Samples]:
        return self.setup.evaluate(model, self.accelerator)

    def forget_accuracy(self, model: nn.Module) -> float:
        setup = self.setup
        return forget_sample_accuracy(pipeline_for(setup.task, model), setup.classifier, setup.forgotten, setup.protocol,
                                      self.accelerator)

    def oracle_store(self) -> OracleStore:
        def save(model: nn.Module, folder: Path) -> None:
            save_pipeline(pipeline_for(self.task, model), folder)

        def load(folder: Path) -> nn.Module:
            return pipeline_denoiser(load_pipeline(folder)).eval()

        return save, load, "model_index.json"

    def report_entries(self) -> dict:
        return {"evaluation": self.setup.protocol_record(self.accelerator.mixed_precision)}

    def write(self, model: nn.Module, output_dir: Path, before: Samples, after: Samples) -> str:
        unlearned = pipeline_for(self.task, model.cpu().eval())
        save_pipeline(unlearned, output_dir / PIPELINE_DIR)
        save_samples_figure({"before": before, "after": after}, output_dir / SAMPLES_FILE, pipeline_class_names(unlearned),
                            self.setup.forgotten, per_row=GRID_SAMPLES)
        code = output_dir / PIPELINE_DIR / PIPELINE_CODE
        code_sha256 = hashlib.sha256(code.read_bytes()).hexdigest() if code.is_file() else None
        return diffusion_loading(type(unlearned).__name__, type(pipeline_denoiser(unlearned)).__name__, code_sha256)


class DiffusionKind:
    name = "diffusion"

    def check_job(self, job: ForgetJob) -> None:
        job.split_spec()
        judge_name(job, get_preset(job.model))
        if job.data is not None:
            image_folder_splits(job.data)  # the folders checked before any work
        if job.data_free_guidance is not None:
            raise UserError("--data-free-guidance applies to text-to-image models; a class-conditional data-free run samples "
                            "its training data at --eval-guidance, since they are its FID reference too")

    def check_evaluation(self, job: ForgetJob) -> None:
        job.check_classes_only()
        if job.subclasses or job.random_fraction is not None:
            raise UserError("diffusion models are evaluated per class; pass --class (or nothing)")

    def load_task(self, preset: DiffusionPreset, *, pretrained: str | None, data: str | Path | None,
                  cache_dir: str | Path | None, accelerator: Accelerator) -> DiffusionTask:
        train, test, data_id = load_datasets(preset, data, cache_dir)
        return load_diffusion_task(preset, train, test, data_id, pretrained=pretrained, cache_root=cache_root(cache_dir),
                                   accelerator=accelerator)

    def prepare_run(self, job: ForgetJob, preset: DiffusionPreset, accelerator: Accelerator) -> DiffusionRun:
        """Data-free (``--data-free``, or no ``--data`` for a preset whose data is not embedded): the forget and
        retain sets are the pretrained model's own samples, latents for latent models (see ``prepare_diffusion``)."""
        return DiffusionRun(job, prepare_diffusion(job, preset, accelerator), accelerator)

    def evaluate_model(self, job: ForgetJob, preset: DiffusionPreset,
                       accelerator: Accelerator) -> tuple[dict, Callable[[Path], None]]:
        """Sample every evaluated class under the protocol, judge the samples, and measure FID against real images
        (``--data`` or the embedded data; none without real images). ``--class`` marks the forgotten classes. Also
        returns how to draw the samples (a labelled grid, forgotten rows marked) into a PNG."""
        protocol = sampling_protocol(job, preset)
        root = cache_root(job.cache_dir)
        real = real_datasets(preset, job.data)
        pipeline = load_diffusion_pipeline(preset, pretrained=job.pretrained, data=real, cache_root=root, accelerator=accelerator)
        num_classes = pipeline_num_classes(pipeline)
        forgotten = list(job.classes)
        if forgotten:
            check_ids(forgotten, num_classes, "class")
        remaining = remain_classes(num_classes, forgotten, remain_count(job, preset), job.seed)
        classifier_name = judge_name(job, preset)
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
        names = pipeline_class_names(pipeline)
        return {"metrics": metrics, "evaluation": evaluation}, lambda path: save_samples_figure(
            {"samples": samples}, path, names, forgotten, per_row=GRID_SAMPLES)

    def pretrain_summary(self, task: DiffusionTask, *, data: str | None, cache_dir: str | None,
                         accelerator: Accelerator) -> tuple[str, Callable[[Path], None]]:
        judge = load_classifier_task(task.preset.eval_classifier, data=data, cache_dir=cache_dir, accelerator=accelerator).model
        sampling = task.preset.sampling
        pipeline = pipeline_for(task)
        per_class = classify_generated(pipeline, judge, list(range(task.num_classes)), 50, accelerator,
                                       guidance=sampling.guidance, steps=sampling.steps)
        summary = f"samples recognised as their class by {task.preset.eval_classifier}: " + ", ".join(
            f"{c}: {m['accuracy']:.2f}" for c, m in sorted(per_class.items()))
        return summary, lambda folder: save_pipeline(pipeline, folder)
