"""The text-to-image kind: a ``StableDiffusionPipeline`` erases a concept given as prompts, trained on its own
generations and judged per prompt (ALGORITHMS_T2I.md)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from timm.data import ImageNetInfo
from torch import nn

from genunlearn.attacks import AttackJudge, attack_configs, run_attacks
from genunlearn.data.captioned_digits import VOCABULARY, caption_images, paraphrases
from genunlearn.data.captioned_folder import captioned_fingerprint, read_captioned_folder
from genunlearn.data.split import ForgetSplit, SplitSpec, make_forget_split
from genunlearn.engine.fingerprint import model_fingerprint, text_encoder_fingerprints, tensors_fingerprint
from genunlearn.errors import UserError
from genunlearn.eval.concepts import evaluate_concepts, prompt_class, real_retain_reference, retain_reference
from genunlearn.eval.grids import SAMPLES_FILE, save_samples_figure
from genunlearn.eval.judge import is_preset_classifier, load_eval_classifier
from genunlearn.eval.sd_protocols import ProtocolOptions, SDProtocols
from genunlearn.kinds.base import PIPELINE_DIR, GeneratorRun, OracleStore
from genunlearn.kinds.diffusion_setup import GRID_SAMPLES, Evaluation, cached_evaluation, generated_data_id, job_sampling
from genunlearn.models.loading import load_datasets
from genunlearn.models.presets import TextToImagePreset, get_preset
from genunlearn.models.prompt_sampling import denoiser_of, erased_model, sd_pipeline_for
from genunlearn.models.text_to_image_loading import load_captioned_digits, load_sd_pipeline, load_text_to_image_pipeline
from genunlearn.models.checkpointing import enable_gradient_checkpointing
from genunlearn.models.lora_export import LoraExport, lora_from_delta, save_lora
from genunlearn.precision import numerics
from genunlearn.runs.job import ForgetJob
from genunlearn.storage.cache import cache_root
from genunlearn.storage.pipeline_folder import save_pipeline
from genunlearn.tasks.concepts import ConceptPrompts, check_prompts, concept_task, images_by_prompt
from genunlearn.tasks.text_to_image import TextConditioned, TextToImageTask
from genunlearn.tasks.text_to_image_pipelines import text_to_image_task



@dataclass(frozen=True)
class ConceptProtocol:
    """How a text-to-image model is evaluated: ``per_prompt`` generations of each prompt, DDIM ``steps`` at
    ``guidance``, seeded by (``seed``, prompt id); ``data_guidance``: the guidance its generated training data are
    sampled with (same steps)."""

    per_prompt: int
    guidance: float
    steps: int
    seed: int
    data_guidance: float

    def sampling(self) -> dict:
        return {"per_prompt": self.per_prompt, "guidance": self.guidance, "steps": self.steps, "seed": self.seed}


def concept_protocol(job: ForgetJob, preset: TextToImagePreset) -> ConceptProtocol:
    """The job's evaluation settings, else the preset's sampling; the training data at ``--data-free-guidance``, else
    at the evaluation's guidance (the references train on generations at their sampling guidance)."""
    per_prompt, guidance, steps = job_sampling(job, preset.sampling)
    return ConceptProtocol(per_prompt, guidance, steps, seed=job.seed,
                           data_guidance=guidance if job.data_free_guidance is None else job.data_free_guidance)


def judge_class_names(name: str) -> list[str]:
    """The classes of the judge called ``name``: a classifier preset's embedded data classes, else ImageNet's (timm's
    names)."""
    if is_preset_classifier(name):
        return list(load_datasets(get_preset(name), None)[0].classes)
    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def check_vocabulary(preset: TextToImagePreset, prompts: list[str]) -> None:
    """A UserError naming the first word the tiny embedded pipeline's tokenizer does not know."""
    if preset.hub_id is None and preset.dataset == "captioned-digits":
        for prompt in prompts:
            unknown = [word for word in prompt.split() if word not in VOCABULARY]
            if unknown:
                raise UserError(f"{preset.name} knows no word {unknown[0]!r} (in {prompt!r}); its captions use: "
                                f"{' '.join(VOCABULARY)}")


def concept_prompts(job: ForgetJob, preset: TextToImagePreset, class_names: list[str]) -> ConceptPrompts:
    """The job's prompts: ``--concept``; ``--retain-prompts``, else the preset's retain prompts without those naming an
    erased concept's class; ``--paraphrase-prompts``, else (captioned digits) the concept captions' other phrasings."""
    forget = list(job.concepts)

    def named(prompts: list[str]) -> set[int]:
        return {c for c in (prompt_class(p, class_names) for p in prompts) if c is not None}

    erased = named(forget)
    remain = list(job.retain_prompts) or [p for p in preset.retain_prompts if p not in forget and not named([p]) & erased]
    paraphrase = list(job.paraphrase_prompts)
    if not paraphrase and preset.dataset == "captioned-digits":
        paraphrase = [p for prompt in forget for p in paraphrases(prompt)]
    return ConceptPrompts(forget, remain, paraphrase, job.anchor)  # check_job has checked the words the user gave


@dataclass
class ConceptSetup:
    """What a concept erasure is measured with: the task and split, the prompts and their groups, the judge and the
    FID references (the judge's features of the original model's remain generations, and of real images of the remain
    prompts where the preset's data has them)."""

    task: TextToImageTask
    split: ForgetSplit
    prompts: ConceptPrompts
    judge: nn.Module
    judge_name: str
    class_names: list[str]
    protocol: ConceptProtocol
    reference: torch.Tensor
    real_reference: torch.Tensor | None = None
    papers: SDProtocols | None = None

    def evaluate(self, model: nn.Module | None, accelerator: Accelerator, groups: dict | None = None) -> Evaluation:
        """The figures and generations of ``model`` (None: the original): every prompt group, or only ``groups``
        (then without the papers' protocols)."""
        metrics, generations = evaluate_concepts(self.task, self.judge, self.class_names, groups or self.prompts.groups(),
                                                 accelerator, model=model, prompts=self.prompts.table,
                                                 reference=self.reference, real_reference=self.real_reference,
                                                 **self.protocol.sampling())
        if self.papers is not None and groups is None:
            metrics.update(self.papers.evaluate(sd_pipeline_for(self.task, model), accelerator, steps=self.protocol.steps,
                                                guidance=self.protocol.guidance))
        return metrics, generations


def protocol_options(job: ForgetJob) -> ProtocolOptions:
    """The papers' protocols ``job`` asks for (``--i2p-prompts``, ``--coco-prompts`` and their files)."""
    return ProtocolOptions(job.i2p_prompts, job.nudity_threshold, job.coco_prompts, job.coco_images, job.clip_model,
                           job.fid_inception_weights, job.protocol_rows)


def load_judge(name: str, *, weights: str | None, cache_dir: str | Path | None,
               accelerator: Accelerator) -> tuple[nn.Module, list[str]]:
    """``(judge, its class names)``: the classifier called ``name`` on the device: a preset (trained on its embedded
    data, or ``weights``) or a timm model (``weights``, else the hub's)."""
    names = judge_class_names(name)
    judge = load_eval_classifier(name, weights=weights, num_classes=len(names), data=None, cache_dir=cache_dir,
                                 accelerator=accelerator)
    return judge.to(accelerator.device), names


def prepare_concepts(job: ForgetJob, preset: TextToImagePreset, accelerator: Accelerator) -> ConceptSetup:
    """Load the pipeline, resolve the prompts, generate the training data and build the split and measures."""
    protocol = concept_protocol(job, preset)
    judge_name = job.eval_classifier or preset.eval_classifier
    judge, class_names = load_judge(judge_name, weights=job.eval_classifier_weights, cache_dir=job.cache_dir,
                                    accelerator=accelerator)
    prompts = concept_prompts(job, preset, class_names)
    root = cache_root(job.cache_dir)
    pipeline = load_text_to_image_pipeline(preset, pretrained=job.pretrained, cache_root=root, accelerator=accelerator)
    images = read_captioned_folder(job.data) if job.data is not None else ()
    task = concept_task(pipeline, prompts, per_prompt=job.data_free_samples, guidance=protocol.data_guidance,
                        steps=protocol.steps, seed=job.seed, images=images, preset=preset, cache_dir=root,
                        accelerator=accelerator)
    if job.gradient_checkpointing:
        enable_gradient_checkpointing(task.model)
    split = make_forget_split(task.train_data, task.test_data, SplitSpec("class", classes=tuple(prompts.groups()["forget"]),
                                                                         seed=job.seed))
    reference = retain_reference(task, judge, prompts.groups()["remain"], accelerator, **protocol.sampling())
    return ConceptSetup(task, split, prompts, judge, judge_name, class_names, protocol, reference,
                        real_remain_features(preset, prompts, judge), protocol_options(job).load())


def real_remain_features(preset: TextToImagePreset, prompts: ConceptPrompts, judge: nn.Module) -> torch.Tensor | None:
    """The judge's features of real images of the remain prompts: the embedded captioned digits' (every digit of a
    caption's digit, in its style); None for other data, or when a remain prompt is no caption."""
    if preset.dataset != "captioned-digits":
        return None
    images = [caption_images(prompts.table[i]) for i in prompts.groups()["remain"]]
    return None if any(part is None for part in images) else real_retain_reference(images, judge)


def concept_record(setup: ConceptSetup, job: ForgetJob, mixed_precision: str) -> dict:
    """The report's ``prompts`` and ``evaluation`` entries: what was erased, kept and held out, and how it was judged."""
    return {"prompts": setup.prompts.to_dict(),
            "evaluation": {**setup.protocol.sampling(), "classifier": setup.judge_name,
                           "sampler": f"{type(setup.task.sampler(1)).__name__} from the pipeline's noise schedule",
                           "fid_features": f"{setup.judge_name} pre-logits",
                           "fid_reference": "the original model's generations of the remain prompts, other seeds",
                           "fid_real_reference": None if setup.real_reference is None else
                           "the embedded digits of the remain prompts' digits, in their styles",
                           "data_per_prompt": job.data_free_samples, "data_guidance": setup.protocol.data_guidance,
                           "mixed_precision": mixed_precision,
                           "training_data": "the model's own generations" if job.data is None else
                           f"the captioned images in {job.data} for their prompts, the model's own generations for the rest",
                           **protocol_options(job).record()}}


LORA_DIR = "lora"  # --export-lora-rank's folder in a run


FAMILIES = {"StableDiffusionPipeline": "Stable Diffusion 1.x/2.x", "StableDiffusionXLPipeline": "SD-XL",
            "StableDiffusion3Pipeline": "SD3, flow matching"}


def pipeline_loading(pipeline_class: str = "StableDiffusionPipeline", denoiser: str = "UNet2DConditionModel",
                     lora_trained: int | None = None, text_encoder: str | None = None) -> str:
    """The model card's line on loading a run's ``pipeline/`` (a ``pipeline_class`` folder, the full ``denoiser``'s
    weights; ``lora_trained``: the rank of the LoRA factors the erasure trained, merged into them; ``text_encoder``:
    the class of the text encoder the erasure trained instead, as AdvUnlearn's)."""
    folder = "text_encoder" if text_encoder else "transformer" if "Transformer" in denoiser else "unet"
    how = "full weights" if lora_trained is None else f"rank-{lora_trained} LoRA factors, merged"
    return (f'`pipeline/` is a diffusers pipeline folder ({pipeline_class}, {FAMILIES.get(pipeline_class, "text-to-image")}; '
            f'the {folder} erased, trained as {how}): `{pipeline_class}.from_pretrained("RUN/pipeline")` loads it with '
            f'diffusers alone; the {folder} alone: `{text_encoder or denoiser}.from_pretrained("RUN/pipeline", '
            f'subfolder="{folder}")`.')


class TextToImageRun(GeneratorRun):
    setup: ConceptSetup
    lora: LoraExport | None = None  # the erasure as a LoRA, when the job exports one (``exports``)

    @property
    def data_id(self) -> str:
        """The retrain oracle's data: the original model's generations of these prompts (and ``--data``'s images)."""
        table = hashlib.sha256(json.dumps(self.setup.prompts.table).encode()).hexdigest()[:12]
        images = "" if self.job.data is None else f"-{captioned_fingerprint(read_captioned_folder(self.job.data), self.job.cache_dir)}"
        protocol = self.setup.protocol
        generated = generated_data_id(self.task.model, self.job.data_free_samples, protocol.data_guidance, protocol.steps)
        return f"{generated}-{table}{images}"

    def evaluate_before(self) -> Evaluation:
        setup, task = self.setup, self.task
        key = ["text-to-image", model_fingerprint(task.model), *text_encoder_fingerprints(task), model_fingerprint(task.vae),
               setup.protocol.sampling(), setup.prompts.table, setup.prompts.groups(), setup.judge_name,
               protocol_options(self.job).record(), setup.papers and [asdict(row) for row in setup.papers.rows()],
               model_fingerprint(setup.judge), tensors_fingerprint({"reference": setup.reference}),
               setup.real_reference is not None and tensors_fingerprint({"real": setup.real_reference}),
               numerics(self.accelerator)]
        return cached_evaluation(key, lambda: setup.evaluate(None, self.accelerator), cache_root(self.job.cache_dir),
                                 self.accelerator)

    def evaluate(self, model: nn.Module) -> Evaluation:
        return self.setup.evaluate(model, self.accelerator)

    def forget_accuracy(self, model: nn.Module) -> float:
        groups = {"forget": self.setup.prompts.groups()["forget"]}
        return self.setup.evaluate(model, self.accelerator, groups)[0]["forget_acc"]

    def oracle_store(self) -> OracleStore:
        def save(model: nn.Module, folder: Path) -> None:
            save_pipeline(sd_pipeline_for(self.task, model), folder)

        def load(folder: Path) -> nn.Module:
            return denoiser_of(load_sd_pipeline(folder)).eval()

        return save, load, "model_index.json"

    def report_entries(self) -> dict:
        return concept_record(self.setup, self.job, self.accelerator.mixed_precision)

    def exports(self, model: nn.Module) -> dict:
        """With ``--export-lora-rank R``, or trained as rank-R LoRA factors (``--lora-rank R``: exact at that rank): the
        erasure as a rank-R LoRA (kept for ``write``), measured as the full erasure is (the original with the LoRA
        merged: what the LoRA-loaded pipeline computes)."""
        rank = self.lora_rank
        if rank is None:
            return {}
        self.lora = lora_from_delta(self.task.model, model, rank)
        figures, _ = self.evaluate(self.lora.merged_into(self.task.model))
        return {"lora": {"rank": rank, "layers": len(self.lora.ranks), "parameters": self.lora.parameter_count(),
                         "relative_error": self.lora.relative_error, "left_out": self.lora.left_out, "after": figures}}

    def attack(self, model: nn.Module) -> dict:
        """The report's ``attacks``: each of ``--attack``'s attacks on ``model``, judged as forget_acc is."""
        setup, groups = self.setup, self.setup.prompts.groups()
        judge = AttackJudge(self.task, setup.judge, setup.class_names, groups["forget"], groups["paraphrase"],
                            groups["remain"], accelerator=self.accelerator, forget_accuracy=self.forget_accuracy,
                            **setup.protocol.sampling())
        return run_attacks(judge, model, attack_configs(self.job.attacks, self.job.attack_settings), self.split)

    @property
    def trained_lora_rank(self) -> int | None:
        """The rank of the LoRA factors the erasure trained (``--lora-rank``), None for full weights."""
        trained = self.job.settings.get("lora_rank")
        return None if trained is None else int(trained)

    @property
    def lora_rank(self) -> int | None:
        """The rank of the LoRA the run writes: ``--export-lora-rank``, else the trained factors'."""
        return self.job.export_lora_rank or self.trained_lora_rank

    def write(self, model: nn.Module, output_dir: Path, before: dict, after: dict) -> str:
        save_pipeline(sd_pipeline_for(self.task, model.cpu().eval()), output_dir / PIPELINE_DIR)
        groups = self.setup.prompts.groups()
        save_samples_figure({"before": before, "after": after}, output_dir / SAMPLES_FILE, self.setup.prompts.table,
                            groups["forget"] + groups["paraphrase"], per_row=GRID_SAMPLES, numbered=False,
                            marked="the erased concept's prompts")
        trained_encoder = type(model.text_encoders[0]).__name__ if isinstance(model, TextConditioned) else None
        loading = pipeline_loading(self.task.pipeline_class.__name__, type(self.task.model).__name__,
                                   self.trained_lora_rank, trained_encoder)
        if self.lora is not None:
            save_lora(self.task.pipeline_class, self.lora, output_dir / LORA_DIR)
            loading += (f' `{LORA_DIR}/` holds the erasure as a rank-{self.lora_rank} LoRA '
                        f'({self.lora.parameter_count():,} parameters): `pipe.load_lora_weights("RUN/{LORA_DIR}")` on the '
                        'original pipeline switches it on (diffusers with peft), `pipe.unload_lora_weights()` off.')
        return loading


class TextToImageKind:
    name = "text-to-image"

    def check_job(self, job: ForgetJob) -> None:
        if job.classes or job.subclasses or job.random_fraction is not None:
            raise UserError("text-to-image models erase concepts given as prompts; pass --concept PROMPT instead of --class")
        if job.data_free_guidance is not None and job.data_free_guidance < 0:
            raise UserError(f"--data-free-guidance must be non-negative, got {job.data_free_guidance}")
        if job.data is not None:  # every caption must be an erased or a retained prompt
            retained = job.retain_prompts or get_preset(job.model).retain_prompts
            images_by_prompt(read_captioned_folder(job.data), [*job.concepts, *retained],
                             list(range(len(job.concepts) + len(retained))))
        if job.export_lora_rank and job.method == "advunlearn" and job.settings.get("train", "text-encoder") == "text-encoder":
            raise UserError("--export-lora-rank exports a change of the UNet; advunlearn trains the text encoder: drop "
                            "--export-lora-rank or --set train=unet")
        check_prompts(job.concepts, job.retain_prompts, job.paraphrase_prompts)
        attack_configs(job.attacks, job.attack_settings)
        protocol_options(job).check()
        check_vocabulary(get_preset(job.model), [*job.concepts, *job.retain_prompts, *job.paraphrase_prompts,
                                                 *([job.anchor] if job.anchor else [])])

    def check_evaluation(self, job: ForgetJob) -> None:
        if not job.concepts:
            raise UserError("name the concept to measure: genunlearn evaluate --concept PROMPT")
        if job.attacks and job.attacked is None:
            raise UserError("name the erased pipeline to attack: genunlearn attack --model ORIGINAL --attacked RUN/pipeline")
        if job.data is not None:
            raise UserError("genunlearn evaluate judges generations only; drop --data")
        self.check_job(job)

    def load_task(self, preset: TextToImagePreset, *, pretrained: str | None, data: str | Path | None,
                  cache_dir: str | Path | None, accelerator: Accelerator) -> TextToImageTask:
        """The pipeline's UNet over the embedded captioned digits (labels: captions)."""
        if data is not None:
            raise UserError("text-to-image presets train on their embedded captions; drop --data")
        train, test, _ = load_captioned_digits(preset)
        pipeline = load_text_to_image_pipeline(preset, pretrained=pretrained, cache_root=cache_root(cache_dir),
                                               accelerator=accelerator)
        return text_to_image_task(pipeline, preset, None, train, test)

    def prepare_run(self, job: ForgetJob, preset: TextToImagePreset, accelerator: Accelerator) -> TextToImageRun:
        return TextToImageRun(job, prepare_concepts(job, preset, accelerator), accelerator)

    def evaluate_model(self, job: ForgetJob, preset: TextToImagePreset,
                       accelerator: Accelerator) -> tuple[dict, Callable[[Path], None]]:
        """Generate every prompt (``--concept`` and its paraphrases when given, the retain prompts) and judge them, of
        the model (or of ``--attacked``'s pipeline, ``genunlearn attack``: the model then is its original, whose
        generations are the attacks' images of the concept); with ``--attack``, attack it."""
        setup = prepare_concepts(job, preset, accelerator)
        attacked = None if job.attacked is None else erased_model(load_sd_pipeline(job.attacked), setup.task.text_encoders)
        attacked = None if attacked is None else attacked.to(accelerator.device).eval()
        metrics, generations = setup.evaluate(attacked, accelerator)
        groups = setup.prompts.groups()
        attacks = {"attacks": TextToImageRun(job, setup, accelerator).attack(attacked)} if job.attacks else {}
        return {"metrics": metrics, **concept_record(setup, job, accelerator.mixed_precision), **attacks}, lambda path: save_samples_figure(
            {"samples": generations}, path, setup.prompts.table, groups["forget"] + groups["paraphrase"],
            per_row=GRID_SAMPLES, numbered=False, marked="the concept's prompts")

    def pretrain_summary(self, task: TextToImageTask, *, data: str | None, cache_dir: str | None,
                         accelerator: Accelerator) -> tuple[str, Callable[[Path], None]]:
        judge, names = load_judge(task.preset.eval_classifier, weights=None, cache_dir=cache_dir, accelerator=accelerator)
        plain = [task.prompts.index(p) for p in task.preset.retain_prompts if p in task.prompts]
        sampling = task.preset.sampling
        metrics, _ = evaluate_concepts(task, judge, names, {"remain": plain}, accelerator, per_prompt=50,
                                       guidance=sampling.guidance, steps=sampling.steps)
        summary = f"generations of the retain prompts recognised by {task.preset.eval_classifier}: {metrics['remain_acc']:.2f}"
        return summary, lambda folder: save_pipeline(sd_pipeline_for(task), folder)

