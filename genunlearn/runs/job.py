"""A forgetting run's identity (``ForgetJob``) and its output folder's guard: what a run is, before any kind's code."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from genunlearn.data.split import SplitSpec, choose_split
from genunlearn.errors import UserError
from genunlearn.models.presets import get_preset
from genunlearn.storage.cache import cache_root
from genunlearn.storage.content_hash import tree_fingerprint

RUN_FILE = "run.json"
LOG_FILE = "run.log"
CHECKPOINTS = "checkpoints"


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
    resume: bool | str = False  # True: the newest checkpoint; a path: that checkpoint of this run
    eval_samples: int = 100
    data_free: bool = False
    data_free_samples: int = 100
    data_free_guidance: float | None = None  # the generated training data's guidance (None: the evaluation's)
    eval_steps: int | None = None
    eval_guidance: float | None = None
    eval_classifier: str | None = None
    eval_classifier_weights: str | None = None
    remain_classes: int | None = None
    fid_features: str = "classifier"
    fid_library: str = "torchmetrics"
    fid_inception_weights: str | None = None
    mixed_precision: str = "no"  # autocast: no, fp16, bf16, or auto (the launcher's); genunlearn.precision
    tf32: bool = False  # TF32 matrix products and convolutions on NVIDIA GPUs
    gradient_checkpointing: bool = False
    compare_retrain: bool = False
    relearn_steps: int = 0
    relearn_samples: int = 8
    relearn_lr: float | None = None
    report_to: str | None = None  # experiment tracker(s): tensorboard, wandb, all, none (genunlearn.runs.tracking)
    concepts: list[str] = field(default_factory=list)  # text-to-image: the prompts of the concept to erase
    anchor: str | None = None  # text-to-image: the prompt rl pulls the concept towards
    retain_prompts: list[str] = field(default_factory=list)  # text-to-image: kept prompts (empty: the preset's)
    paraphrase_prompts: list[str] = field(default_factory=list)  # text-to-image: held-out prompts of the concept
    i2p_prompts: str | None = None  # text-to-image: an I2P prompt CSV, its generations judged by NudeNet
    nudity_threshold: float = 0.6  # text-to-image: the NudeNet score above which a body part counts as found
    coco_prompts: str | None = None  # text-to-image: a COCO caption CSV, its generations scored by CLIP and FID
    coco_images: str | None = None  # text-to-image: real COCO images the coco_prompts' FID compares with
    clip_model: str | None = None  # text-to-image: a local CLIP model folder for the CLIP score
    protocol_rows: int | None = None  # text-to-image: the first N rows of each protocol CSV (None: all)
    export_lora_rank: int | None = None  # text-to-image: also export the erasure as a LoRA of this rank (lora/), measured
    attacks: list[str] = field(default_factory=list)  # text-to-image: attacks on the erasure (genunlearn.attacks)
    attack_settings: dict = field(default_factory=dict)  # text-to-image: {"attack.setting": value}
    attacked: str | None = None  # genunlearn attack: the pipeline folder attacked (the model's own data and images stay the original's)

    def identity(self) -> dict:
        """What makes two runs the same run: every setting but where caches live, whether to resume, where figures
        are also reported, and gradient checkpointing (which changes memory, not results), and the content of what
        the run reads (``input_contents``)."""
        settings = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(self).items()
            if k not in ("cache_dir", "resume", "output_dir", "gradient_checkpointing", "report_to")
        }
        return {**settings, **self.input_contents()}

    def input_contents(self) -> dict:
        """Content hashes of what the run reads, so a run is named by content, not by paths: the preset's recipe, or
        a model folder's files (``model_content``), ``--data``'s files (``data_content``) and a local ``--pretrained``'s
        (``pretrained_content``; None for a hub id)."""
        cache = cache_root(self.cache_dir)
        return {
            "model_content": tree_fingerprint(Path(self.model), cache) if Path(self.model).is_dir()
            else get_preset(self.model).fingerprint(),
            "data_content": None if self.data is None else tree_fingerprint(Path(self.data), cache),
            "pretrained_content": None if self.pretrained is None else tree_fingerprint(Path(self.pretrained), cache),
        }

    def run_record(self) -> dict:
        """``run.json``: the identity and the output folder's resolved path (recorded, not compared: a moved folder
        stays the same run)."""
        return {**self.identity(), "output_path": str(self.output_dir.resolve())}

    def check_counts(self) -> None:
        """A UserError for a count below its minimum, before any work (0 never means "the default")."""
        minimums = {"--eval-samples": (self.eval_samples, 1), "--data-free-samples": (self.data_free_samples, 1),
                    "--eval-steps": (self.eval_steps, 1), "--remain-classes": (self.remain_classes, 1),
                    "--relearn-samples": (self.relearn_samples, 1), "--relearn-steps": (self.relearn_steps, 0),
                    "--protocol-rows": (self.protocol_rows, 1), "--export-lora-rank": (self.export_lora_rank, 1)}
        for flag, (value, least) in minimums.items():
            if value is not None and value < least:
                raise UserError(f"{flag} must be at least {least}, got {value}")
        if self.relearn_lr is not None and self.relearn_lr <= 0:
            raise UserError(f"--relearn-lr must be positive, got {self.relearn_lr}")
        if not 0.0 < self.nudity_threshold <= 1.0:
            raise UserError(f"--nudity-threshold must be in (0, 1], got {self.nudity_threshold}")

    def check_classes_only(self) -> None:
        """A UserError for the text-to-image options (concepts, prompt files, the papers' protocols) on a model that
        forgets classes."""
        if (self.concepts or self.anchor or self.retain_prompts or self.paraphrase_prompts or self.i2p_prompts
                or self.coco_prompts or self.export_lora_rank is not None or self.attacks or self.attack_settings):
            raise UserError(f"--concept, --anchor, the prompt files, --export-lora-rank and --attack are for text-to-image models; "
                            f"{self.model} forgets classes: pass --class")

    def split_spec(self) -> SplitSpec:
        """The split a class-forgetting job names (a UserError for a bad or missing one, or for a concept)."""
        self.check_classes_only()
        return choose_split(self.classes, self.random_fraction, self.subclasses, self.seed,
                            ("--class", "--random-fraction", "--subclass"))

    def resume_from(self) -> bool | Path:
        """What the loop resumes from: False, True (the newest checkpoint) or a checkpoint folder of this run."""
        if not isinstance(self.resume, str):
            return self.resume
        path = Path(self.resume)
        if path.resolve().parent != (self.output_dir / CHECKPOINTS).resolve():
            raise UserError(f"--resume_from_checkpoint {path} is not one of {self.output_dir / CHECKPOINTS}'s checkpoints; "
                            "pass latest or one of them")
        return path

    def has_target(self) -> bool:
        """Whether the job names a forgotten part (then its figures are reported separately)."""
        return bool(self.classes or self.subclasses or self.concepts) or self.random_fraction is not None

    def forgotten(self) -> int | str | list[int] | list[str] | None:
        """The forgotten class id(s), or the erased concept's prompt(s)."""
        ids = self.classes or self.subclasses or self.concepts
        return None if not ids else ids[0] if len(ids) == 1 else list(ids)


RESUMABLE_SETTINGS = ("lr", "steps", "log_every", "checkpoint_every", "keep_checkpoints")  # a resume may change these


def resumable_changes(held: dict, wanted: dict) -> dict | None:
    """``{setting: [before, after]}`` when the run ``wanted`` differs from the ``held`` one only in
    ``RESUMABLE_SETTINGS`` (how long and how fast it trains, how it logs), else None."""
    if {k: v for k, v in held.items() if k != "settings"} != {k: v for k, v in wanted.items() if k != "settings"}:
        return None
    before, after = held.get("settings", {}), wanted.get("settings", {})
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return {k: [before.get(k), after.get(k)] for k in changed} if set(changed) <= set(RESUMABLE_SETTINGS) else None


def check_output_dir(job: ForgetJob) -> dict:
    """Refuse to touch an output dir that holds anything but this job's unfinished run (resumable, with
    ``RESUMABLE_SETTINGS`` changed or not); return the settings a resume changes (``resumable_changes``)."""
    out = job.output_dir
    if not out.exists() or {p.name for p in out.iterdir()} <= {RUN_FILE, LOG_FILE}:
        return {}  # empty, or a run that stopped before its first checkpoint left nothing to keep: start afresh
    run_file = out / RUN_FILE
    if not run_file.is_file():
        raise UserError(f"{out} is not empty and holds no genunlearn run; choose a new --output-dir")
    held = read_run_file(run_file)
    if held is None:
        raise UserError(f"{run_file} is corrupt, so the run in {out} cannot be resumed; delete {out} or choose another --output-dir")
    wanted = job.identity()
    changes = resumable_changes(held, wanted) if job.resume else None
    if held != wanted and changes is None:
        before, after = held.get("settings", {}), wanted.get("settings", {})
        allowed = RESUMABLE_SETTINGS if job.resume else ()
        differing = [k for k in sorted(set(held) | set(wanted)) if k != "settings" and held.get(k) != wanted.get(k)]
        differing += [f"settings.{k}" for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k) and k not in allowed]
        raise UserError(f"{out} holds a different run (differs in {', '.join(differing)}); choose another --output-dir "
                        f"(a resume may change only {', '.join(RESUMABLE_SETTINGS)})")
    if (out / "report.json").is_file():
        raise UserError(f"{out} already holds this finished run; choose a new --output-dir to run it again")
    if not job.resume:
        raise UserError(f"{out} holds an unfinished run of this job; add --resume_from_checkpoint latest to continue it")
    return changes or {}


def finished_report(job: ForgetJob) -> dict | None:
    """The report of ``job`` if its output folder already holds it finished, else None."""
    run_file, report_file = job.output_dir / RUN_FILE, job.output_dir / "report.json"
    if run_file.is_file() and report_file.is_file() and read_run_file(run_file) == job.identity():
        try:
            return json.loads(report_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # check_output_dir names the folder when the run is attempted again
    return None


def read_run_file(path: Path) -> dict | None:
    """A run folder's ``run.json`` without what is recorded but not compared (``output_path``), or None when it is
    not a readable JSON object."""
    try:
        held = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return {k: v for k, v in held.items() if k != "output_path"} if isinstance(held, dict) else None
