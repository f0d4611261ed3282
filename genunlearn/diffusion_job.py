"""The main job for class-conditional diffusion models: evaluate by sampling, unlearn, evaluate, write the run folder."""

from __future__ import annotations

import json
import shutil

import torch
from accelerate import Accelerator

from genunlearn.data.generated import generated_datasets
from genunlearn.data.split import check_ids, make_forget_split
from genunlearn.errors import UserError
from genunlearn.eval.generator_eval import (
    SamplingProtocol,
    evaluate_generator,
    fid_setup,
    forget_sample_accuracy,
    protocol_record,
    reference_features,
    reference_images,
)
from genunlearn.eval.grids import save_class_grid
from genunlearn.eval.report import write_report
from genunlearn.engine.fingerprint import model_fingerprint
from genunlearn.job import CHECKPOINTS, RUN_FILE, ForgetJob, check_output_dir, method_config, oracle_and_relearning, run_report
from genunlearn.models.cache import cache_root
from genunlearn.models.diffusion_loading import (
    load_diffusion_pipeline,
    load_pipeline,
    pipeline_for,
    sampler_for,
    save_pipeline,
    task_from_pipeline,
)
from genunlearn.models.eval_classifier import load_eval_classifier
from genunlearn.models.loading import EMBEDDED_DATASETS, load_datasets
from genunlearn.models.pipeline import (
    pipeline_class_names,
    pipeline_denoiser,
    pipeline_num_classes,
)
from genunlearn.models.presets import DiffusionPreset
from genunlearn.models.store import atomic_write_text
from genunlearn.tasks.diffusion import DiffusionTask

PIPELINE_DIR = "pipeline"
GRID_SAMPLES = 8


def remain_classes(num_classes: int, forgotten: list[int], count: int | None, seed: int) -> list[int]:
    """The other classes that stand for the retain set: all of them, or ``count`` chosen by ``seed``, sorted."""
    others = [c for c in range(num_classes) if c not in forgotten]
    if count is None or count >= len(others):
        return others
    if count < 1:
        raise UserError(f"--remain-classes must be at least 1, got {count}")
    order = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))
    return sorted(others[i] for i in order[:count].tolist())


def sampling_protocol(job: ForgetJob, preset: DiffusionPreset) -> SamplingProtocol:
    """The evaluation's sampling protocol: the job's settings, else the preset's."""
    protocol = SamplingProtocol(
        per_class=job.eval_samples,
        guidance=preset.sampling.guidance if job.eval_guidance is None else job.eval_guidance,
        steps=job.eval_steps or preset.sampling.steps,
        seed=job.seed,
    )
    if protocol.per_class < 2 or protocol.steps < 1 or protocol.guidance < 0 or job.data_free_samples < 2:
        raise UserError(
            "--eval-samples and --data-free-samples must be at least 2, --eval-steps at least 1 and --eval-guidance non-negative"
        )
    return protocol


def real_datasets(preset: DiffusionPreset, data: str | None) -> tuple | None:
    """``(train, test, data_id)`` of real images (``data``, or the embedded dataset), or None when there are none."""
    return load_datasets(preset, data) if (data is not None or preset.dataset in EMBEDDED_DATASETS) else None


def prepare_for_memory(task: DiffusionTask, gradient_checkpointing: bool) -> None:
    """Turn on the denoiser's gradient checkpointing (activations recomputed in backward: less memory, ~30% slower)."""
    if gradient_checkpointing:
        task.model.enable_gradient_checkpointing()


def run_diffusion_job(job: ForgetJob, preset: DiffusionPreset, accelerator: Accelerator) -> dict:
    """Run ``job`` on a diffusion preset and return its report (written to ``job.output_dir`` by the main process).

    Data-free (``--data-free``, or no ``--data`` for a preset whose data is not embedded): the forget and retain
    sets are the pretrained model's own samples, latents for latent models."""
    method, cfg = method_config(job.method, preset, {"seed": job.seed, **job.settings})
    spec = job.split_spec()
    if spec.kind != "class":
        raise UserError("diffusion models forget whole classes; pass --class")
    protocol = sampling_protocol(job, preset)
    data_free = job.data_free or (job.data is None and preset.dataset not in EMBEDDED_DATASETS)
    check_output_dir(job)
    accelerator.wait_for_everyone()
    real = real_datasets(preset, job.data)
    if real is not None:
        make_forget_split(real[0], real[1], spec)  # validates the class before anything heavy
    root = cache_root(job.cache_dir)
    pipeline = load_diffusion_pipeline(preset, pretrained=job.pretrained, data=real, cache_root=root, accelerator=accelerator)
    num_classes = pipeline_num_classes(pipeline)
    forgotten = list(spec.classes)
    check_ids(spec.classes, num_classes, "class")
    remaining = remain_classes(num_classes, forgotten, job.remain_classes or preset.remain_classes, job.seed)
    if data_free:
        latents = pipeline.vae is not None
        train, test = generated_datasets(
            sampler_for(pipeline), pipeline_class_names(pipeline), forgotten + remaining, job.data_free_samples, accelerator,
            guidance=protocol.guidance, steps=protocol.steps, seed=job.seed, cache_dir=root, latents=latents,
        )
        task = task_from_pipeline(preset, pipeline, train, test, cache_root=root, encoded_data=latents)
    else:
        task = task_from_pipeline(preset, pipeline, real[0], real[1], cache_root=root)
    split = make_forget_split(task.train_data, task.test_data, spec)
    prepare_for_memory(task, job.gradient_checkpointing)
    classifier_name = job.eval_classifier or preset.eval_classifier
    classifier = load_eval_classifier(classifier_name, weights=job.eval_classifier_weights, num_classes=num_classes,
                                      data=job.data, cache_dir=job.cache_dir, accelerator=accelerator)
    if accelerator.is_main_process:
        job.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(job.output_dir / RUN_FILE, json.dumps(job.identity(), indent=2))
    fid = fid_setup(job.fid_features, classifier, classifier_name, job.fid_library, job.fid_inception_weights, accelerator.device)
    reference = reference_images(task, split.retain, remaining)
    features = reference_features(reference, fid)

    def evaluate(model: torch.nn.Module) -> tuple[dict, dict[int, torch.Tensor]]:
        return evaluate_generator(pipeline_for(task, model), classifier, forgotten, remaining, features, fid, protocol, accelerator)

    before, samples_before = evaluate(task.model)
    result = method.run(task, split, cfg, accelerator, checkpoint_dir=job.output_dir / CHECKPOINTS, resume=job.resume)
    after, samples_after = evaluate(result.model)
    evaluation = protocol_record(protocol, fid, classifier_name, forgotten + remaining, reference, data_free, accelerator.mixed_precision)

    def forget_accuracy(model: torch.nn.Module) -> float:
        return forget_sample_accuracy(pipeline_for(task, model), classifier, forgotten, protocol, accelerator)

    def save_oracle(model: torch.nn.Module, folder) -> None:
        save_pipeline(pipeline_for(task, model), folder)

    def load_oracle(folder) -> torch.nn.Module:
        return pipeline_denoiser(load_pipeline(folder)).eval()

    data_id = real[2] if real is not None and not data_free else "generated"
    if data_free and (job.compare_retrain or job.relearn_steps):  # the oracle trains on this model's own samples
        data_id = f"generated-{model_fingerprint(task.model)}-{job.data_free_samples}"
    extras = oracle_and_relearning(job, task, split, data_id, result.model, after, lambda m: evaluate(m)[0], forget_accuracy,
                                   (save_oracle, load_oracle, "model_index.json"), accelerator)
    report = run_report("diffusion", job, preset, split, cfg, result, accelerator, evaluation=evaluation,
                        before=before, after=after, weights=f"{PIPELINE_DIR}/", **extras)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_pipeline(pipeline_for(task, accelerator.unwrap_model(result.model).cpu().eval()), job.output_dir / PIPELINE_DIR)
        for name, samples in (("samples_before.png", samples_before), ("samples_after.png", samples_after)):
            save_class_grid([samples[c][:GRID_SAMPLES] for c in sorted(samples)], job.output_dir / name)
        write_report(job.output_dir, report)
        shutil.rmtree(job.output_dir / CHECKPOINTS, ignore_errors=True)
    accelerator.wait_for_everyone()
    return report

