"""The classifier kind: a timm (or registered) network on labelled images, measured by accuracy and MIA."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from accelerate import Accelerator
from torch import nn

from genunlearn.data.folders import image_folder_splits
from genunlearn.data.split import ForgetSplit, make_forget_split
from genunlearn.errors import UserError
from genunlearn.eval.classify import accuracy, evaluate_classifier, per_class_accuracy, predict_logits
from genunlearn.eval.model_card import classifier_loading
from genunlearn.kinds.base import OracleStore
from genunlearn.models.loading import load_classifier_task, load_datasets, load_network
from genunlearn.models.presets import ClassifierPreset
from genunlearn.models.checkpointing import enable_gradient_checkpointing
from genunlearn.runs.job import ForgetJob
from genunlearn.storage.cache import cache_root
from genunlearn.storage.files import WEIGHTS_NAME, load_weights, save_model_dir
from genunlearn.storage.timm_folder import save_classifier
from genunlearn.tasks.classifier import ClassifierTask, build_classifier

MODEL_DIR = "model"


def save_run_classifier(model: nn.Module, preset: ClassifierPreset, classes: list[str], folder: Path, metadata: dict) -> str:
    """``save_classifier`` with the preset's input size and normalisation (default: mean 0.5, std 0.5 on [0, 1] pixels)."""
    size = (preset.channels, preset.image_size, preset.image_size)
    return save_classifier(model, folder, classes, input_size=size, normalisation=preset.normalisation(), metadata=metadata)


@dataclass
class ClassifierRun:
    job: ForgetJob
    preset: ClassifierPreset
    task: ClassifierTask
    split: ForgetSplit
    data_id: str
    accelerator: Accelerator
    weights: str = f"{MODEL_DIR}/{WEIGHTS_NAME}"

    def evaluate_before(self) -> tuple[dict, None]:
        return self.evaluate(self.task.model)

    def evaluate(self, model: nn.Module) -> tuple[dict, None]:
        return evaluate_classifier(model, self.split, self.accelerator), None

    def forget_accuracy(self, model: nn.Module) -> float:
        return accuracy(*predict_logits(model.to(self.accelerator.device), self.split.forget, self.accelerator))

    def oracle_store(self) -> OracleStore:
        preset, classes, split = self.preset, self.task.train_data.classes, self.split

        def save(model: nn.Module, folder: Path) -> None:
            save_model_dir(model, {"preset": preset.to_dict(), "classes": classes, "retrained_without": split.summary()}, folder)

        def load(folder: Path) -> nn.Module:
            oracle = build_classifier(preset, len(classes))
            load_weights(oracle, folder)
            return oracle.eval()

        return save, load, WEIGHTS_NAME

    def report_entries(self) -> dict:
        return {}

    def exports(self, model: nn.Module) -> dict:
        return {}

    def write(self, model: nn.Module, output_dir: Path, before: None, after: None) -> str:
        loadable = save_run_classifier(model, self.preset, self.task.train_data.classes, output_dir / MODEL_DIR,
                                       {"preset": self.preset.to_dict(), "unlearned": self.job.identity()})
        return classifier_loading(loadable, self.preset, self.task.num_classes)


class ClassifierKind:
    name = "classifier"

    def check_job(self, job: ForgetJob) -> None:
        job.split_spec()
        if job.data is not None:
            image_folder_splits(job.data)  # the folders checked before any work
        if job.data_free:
            raise UserError("--data-free applies to diffusion models; classifiers forget from their training data")
        if job.data_free_guidance is not None:
            raise UserError("--data-free-guidance applies to text-to-image models; classifiers forget from their training data")

    def check_evaluation(self, job: ForgetJob) -> None:
        job.check_classes_only()

    def load_task(self, preset: ClassifierPreset, *, pretrained: str | None, data: str | Path | None,
                  cache_dir: str | Path | None, accelerator: Accelerator) -> ClassifierTask:
        return load_classifier_task(preset, pretrained=pretrained, data=data, cache_dir=cache_dir, accelerator=accelerator)

    def prepare_run(self, job: ForgetJob, preset: ClassifierPreset, accelerator: Accelerator) -> ClassifierRun:
        train, test, data_id = load_datasets(preset, job.data, job.cache_dir)
        split = make_forget_split(train, test, job.split_spec())
        network = load_network(preset, train, data_id, pretrained=job.pretrained, cache_dir=job.cache_dir, accelerator=accelerator)
        task = ClassifierTask(preset, network, train, test, cache_dir=cache_root(job.cache_dir))
        if job.gradient_checkpointing:
            enable_gradient_checkpointing(task.model)
        return ClassifierRun(job, preset, task, split, data_id, accelerator)

    def evaluate_model(self, job: ForgetJob, preset: ClassifierPreset, accelerator: Accelerator) -> tuple[dict, None]:
        """Accuracy on all training and test images, test accuracy per class and, with a forgotten part, the forget
        run's metrics (forget/retain/test accuracy, MIA)."""
        train, test, data_id = load_datasets(preset, job.data, job.cache_dir)
        split = make_forget_split(train, test, job.split_spec()) if job.has_target() else None
        network = load_network(preset, train, data_id, pretrained=job.pretrained, cache_dir=job.cache_dir,
                               accelerator=accelerator).to(accelerator.device)
        metrics = {}
        for name, dataset in (("train_acc_all", train), ("test_acc_all", test)):
            logits, labels = predict_logits(network, dataset, accelerator)
            metrics[name] = accuracy(logits, labels)
        metrics["per_class_acc"] = per_class_accuracy(logits, labels)
        if split is not None:
            metrics.update(evaluate_classifier(network, split, accelerator))
        return {"metrics": metrics, "data": data_id}, None

    def pretrain_summary(self, task: ClassifierTask, *, data: str | None, cache_dir: str | None,
                         accelerator: Accelerator) -> tuple[str, Callable[[Path], None]]:
        test_acc = accuracy(*predict_logits(task.model.to(accelerator.device), task.test_data, accelerator))

        def save(folder: Path) -> None:
            save_run_classifier(task.model, task.preset, task.train_data.classes, folder, {"preset": task.preset.to_dict()})

        return f"test accuracy {test_acc:.4f}", save
