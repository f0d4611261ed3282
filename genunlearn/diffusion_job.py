"""The main job for class-conditional diffusion models: evaluate by sampling, unlearn, evaluate, write the run folder."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from genunlearn.data.generated import generated_datasets
from genunlearn.data.split import ForgetSplit, make_forget_split
from genunlearn.errors import UserError
from genunlearn.eval.fid import ClassifierFeatures, frechet_distance
from genunlearn.eval.generative import class_metrics, sample_classes
from genunlearn.eval.grids import save_class_grid
from genunlearn.eval.report import write_report
from genunlearn.job import CHECKPOINTS, RUN_FILE, ForgetJob, check_output_dir, method_config, run_report
from genunlearn.models.cache import cache_root
from genunlearn.models.diffusion_loading import load_diffusion_task, pipeline_for, save_pipeline
from genunlearn.models.loading import load_datasets, load_task
from genunlearn.models.presets import DiffusionPreset
from genunlearn.models.store import atomic_write_text
from genunlearn.tasks.diffusion import DiffusionTask

PIPELINE_DIR = "pipeline"
GRID_SAMPLES = 8


@dataclass(frozen=True)
class SamplingProtocol:
    """How evaluation samples: the same for the model before and after unlearning."""

    per_class: int = 100
    guidance: float = 1.0
    steps: int = 50
    seed: int = 0


def evaluate_generator(
    task: DiffusionTask, model: torch.nn.Module, classifier: torch.nn.Module, split: ForgetSplit,
    protocol: SamplingProtocol, accelerator: Accelerator,
) -> tuple[dict, dict[int, torch.Tensor]]:
    """Metrics of ``model``'s samples (fractions, nats, FID) and the samples themselves, per class.

    ``forget_acc``: fraction of forgotten-class samples the classifier still labels as that class;
    ``forget_entropy``/``forget_prob``: their mean softmax entropy and probability of the class;
    ``remain_acc``: the same accuracy over the other classes; ``fid_remain``: FID of the other classes'
    samples against the retain images (real, or the original model's samples when data-free), in the
    classifier's features.
    """
    forgotten = set(split.spec.classes)
    samples = sample_classes(pipeline_for(task, model), list(range(task.num_classes)), protocol.per_class, accelerator,
                             guidance=protocol.guidance, steps=protocol.steps, seed=protocol.seed)
    per_class = class_metrics(classifier, samples, accelerator.device)
    real_remain = torch.stack([split.retain[i][0] for i in range(len(split.retain))])
    generated_remain = torch.cat([samples[c] for c in sorted(samples) if c not in forgotten])

    def mean(key: str, classes) -> float:
        return sum(per_class[c][key] for c in classes) / len(classes)

    remaining = [c for c in per_class if c not in forgotten]
    metrics = {
        "forget_acc": mean("accuracy", forgotten),
        "forget_entropy": mean("entropy", forgotten),
        "forget_prob": mean("probability", forgotten),
        "remain_acc": mean("accuracy", remaining),
        "fid_remain": frechet_distance(real_remain, generated_remain, ClassifierFeatures(classifier).to("cpu")),
        "per_class_acc": {str(c): per_class[c]["accuracy"] for c in sorted(per_class)},
    }
    return metrics, samples


def run_diffusion_job(job: ForgetJob, preset: DiffusionPreset, accelerator: Accelerator) -> dict:
    """Run ``job`` on a diffusion preset and return its report (written to ``job.output_dir`` by the main process)."""
    method, cfg = method_config(job.method, preset, {"seed": job.seed, **job.settings})
    spec = job.split_spec()
    if spec.kind != "class":
        raise UserError("diffusion models forget whole classes; pass --class")
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
    check_output_dir(job)
    accelerator.wait_for_everyone()
    train, test, data_id = load_datasets(preset, job.data)
    split = make_forget_split(train, test, spec)  # validates the class before anything heavy
    root = cache_root(job.cache_dir)
    task = load_diffusion_task(preset, train, test, data_id, pretrained=job.pretrained, cache_root=root, accelerator=accelerator)
    if job.data_free:
        train, test = generated_datasets(
            pipeline_for(task), train.classes, job.data_free_samples, accelerator,
            guidance=protocol.guidance, steps=protocol.steps, seed=job.seed, cache_dir=root,
        )
        split = make_forget_split(train, test, spec)
    classifier = load_task(preset.eval_classifier, data=job.data, cache_dir=job.cache_dir, accelerator=accelerator).model
    if accelerator.is_main_process:
        job.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(job.output_dir / RUN_FILE, json.dumps(job.identity(), indent=2))
    before, samples_before = evaluate_generator(task, task.model, classifier, split, protocol, accelerator)
    result = method.run(task, split, cfg, accelerator, checkpoint_dir=job.output_dir / CHECKPOINTS, resume=job.resume)
    after, samples_after = evaluate_generator(task, result.model, classifier, split, protocol, accelerator)
    evaluation = {**dataclasses.asdict(protocol), "classifier": preset.eval_classifier,
                  "fid_features": f"{preset.eval_classifier} pre-logits", "fid_library": "torchmetrics", "weights": "raw (no EMA)",
                  "fid_reference": "original model's samples" if job.data_free else "real retain images"}
    report = run_report("diffusion", job, preset, split, cfg, result, accelerator, evaluation=evaluation,
                        before=before, after=after, weights=f"{PIPELINE_DIR}/")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_pipeline(pipeline_for(task, result.model.cpu()), job.output_dir / PIPELINE_DIR)
        for name, samples in (("samples_before.png", samples_before), ("samples_after.png", samples_after)):
            save_class_grid([samples[c][:GRID_SAMPLES] for c in sorted(samples)], job.output_dir / name)
        write_report(job.output_dir, report)
        shutil.rmtree(job.output_dir / CHECKPOINTS, ignore_errors=True)
    accelerator.wait_for_everyone()
    return report
