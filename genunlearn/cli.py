"""Command line: ``genunlearn forget|sweep|evaluate|pretrain|compare|methods|models`` and the scripts in ``scripts/``."""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

import yaml

from genunlearn.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def read_value(text: str) -> object:
    """A setting's value: YAML (numbers, booleans, null, lists), with 1e-4-style numbers read as floats too (YAML 1.1
    wants a dot in them)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_setting(text: str) -> tuple[str, object]:
    """``"KEY=VALUE"`` -> ``(key, value)`` (see ``read_value``); dashes in KEY become underscores."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.replace("-", "_"), read_value(value)


def parse_axis(text: str) -> tuple[str, list]:
    """A sweep axis: ``"lr=5e-5,1e-4"`` -> ``("lr", [5e-05, 0.0001])``."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise argparse.ArgumentTypeError(f"expected KEY=V1,V2,... for a sweep axis, got {text!r}")
    return key.replace("-", "_"), [read_value(v) for v in values.split(",")]


TARGET_PATTERN = re.compile(r"^([a-z_]+)(<=|>=)([-+0-9.eE]+)$")


def parse_target(text: str) -> tuple[str, str, float]:
    """A sweep target: ``"forget_acc<=0.05"`` -> ``("forget_acc", "<=", 0.05)``."""
    from genunlearn.runs.sweep import FIGURES

    match = TARGET_PATTERN.match(text.replace(" ", ""))
    known = sorted({name for names in FIGURES.values() for name in names})
    if match is None or match[1] not in known:
        raise argparse.ArgumentTypeError(f"expected a target like forget_acc<=0.05 or test_acc>=0.9 on one of {', '.join(known)}; got {text!r}")
    return match[1], match[2], float(match[3])


class Parser(argparse.ArgumentParser):
    """argparse that also takes every dashed long option in the underscore spelling of diffusers' example scripts
    (``--output_dir`` for ``--output-dir``)."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._dashed(token) for token in args], namespace)

    def _dashed(self, token: str) -> str:
        flag, sep, value = token.partition("=")
        dashed = flag.replace("_", "-")
        known = self._option_string_actions
        return dashed + sep + value if token.startswith("--") and flag not in known and dashed in known else token


def program(command: str, argv: Sequence[str] | None) -> str:
    """``genunlearn COMMAND`` when called with arguments (the console script), else the script's own name."""
    return f"genunlearn {command}" if argv is not None else Path(sys.argv[0]).name


UNDERSCORE_NOTE = "Every --multi-word option also takes diffusers' spelling (--output_dir, --mixed_precision, ...)."


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model",
                        help="a preset (see `genunlearn models`), a preset YAML file, a timm model name (timm's input "
                        "size and normalisation; needs --data), or a model folder (as --pretrained). Default: --pretrained's "
                        "folder, read from its own config")
    parser.add_argument(
        "--pretrained", "--pretrained_model_name_or_path",
        help="the weights to start from. A model folder as you hold it, alone (no --model needed): a diffusers "
        "UNet2DModel or DiTTransformer2DModel folder (with or without scheduler/ inside or beside it), a DDPMPipeline, "
        "DiTPipeline or genunlearn pipeline folder, or a timm folder (config.json with architecture, e.g. from "
        "save_classifier). With --model: a .safetensors/.pt state dict of that architecture, an hf-hub:ORG/NAME id, or a "
        "diffusion hub id ORG/NAME (needs network). Default: the preset's hub id, else its locally pretrained weights "
        "(trained on first use, then cached)",
    )
    parser.add_argument("--data", help="image-folder dataset ROOT/{train,test}/<class>/*.png instead of the preset's data; "
                        "text-to-image: images captioned with the concept's or retain prompts (metadata.jsonl of "
                        "file_name and text, the imagefolder layout), trained on instead of generations of those prompts")
    parser.add_argument(
        "--cache-dir", help="where pretrained models are cached (default: $GENUNLEARN_CACHE, else ~/.cache/genunlearn)"
    )


def add_target_arguments(parser: argparse.ArgumentParser, title: str) -> None:
    what = parser.add_argument_group(title)
    what.add_argument("--class", dest="classes", nargs="+", default=[], metavar="C",
                      help="class(es) to forget: ids, or names (the data's class folders, the model's label names)")
    what.add_argument("--random-fraction", type=float, help="forget this fraction of training samples, chosen by --seed")
    what.add_argument("--subclass", dest="subclasses", nargs="+", default=[], metavar="S",
                      help="sub-class(es) to forget, ids or class folder names (data folder with superclasses.json)")


def add_concept_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of what a text-to-image model erases and keeps (prompt files: one prompt per line, # comments)."""
    erase = parser.add_argument_group("what to erase (text-to-image models, e.g. --model sd-digits)")
    erase.add_argument("--concept", dest="concepts", action="append", default=[], metavar="PROMPT",
                       help="a prompt of the concept to erase (repeatable), e.g. --concept 'a handwritten digit three'")
    erase.add_argument("--concept-prompts", metavar="FILE", help="more prompts of the concept, erased too (paraphrases)")
    erase.add_argument("--anchor", metavar="PROMPT",
                       help="what the concept's prompts are pulled towards (rl in salun/sfron; SalUn's nudity erasure: 'a photo "
                       "of a person wearing clothes'); default: randomly drawn retain prompts")
    erase.add_argument("--retain-prompts", metavar="FILE",
                       help="prompts to keep, and to train the retain term on (default: the preset's, less those naming the concept's class)")
    erase.add_argument("--paraphrase-prompts", metavar="FILE",
                       help="held-out prompts of the concept, evaluated but never trained on (default for sd-digits: the "
                       "concept captions' other phrasings)")
    erase.add_argument("--export-lora-rank", type=int, metavar="R",
                       help="also write the erasure as a rank-R LoRA in RUN/lora (a truncated SVD of each layer's change; "
                       "pipe.load_lora_weights loads it onto the original pipeline), with the LoRA's own figures in the report")
    papers = parser.add_argument_group("the papers' Stable Diffusion protocols (text-to-image; local files, before and after)")
    papers.add_argument("--i2p-prompts", metavar="CSV",
                        help="I2P prompts (a 'prompt' column, seeds from 'sd_seed' or 'evaluation_seed'), one generation "
                        "each, judged for nudity by NudeNet (pip install nudenet)")
    papers.add_argument("--nudity-threshold", type=float, default=0.6,
                        help="NudeNet score above which an exposed part counts (default 0.6, the papers')")
    papers.add_argument("--coco-prompts", metavar="CSV",
                        help="COCO captions (a 'prompt' column, seeds from 'evaluation_seed'), one generation each, scored by "
                        "CLIP score (--clip-model) and FID against --coco-images")
    papers.add_argument("--coco-images", metavar="DIR", help="real COCO images for the FID of --coco-prompts (needs "
                        "--fid-inception-weights)")
    papers.add_argument("--clip-model", metavar="DIR", help="a CLIP model folder (CLIPModel and CLIPProcessor "
                        "save_pretrained, e.g. openai/clip-vit-large-patch14) for the CLIP score")
    papers.add_argument("--protocol-rows", type=int, metavar="N", help="only the first N rows of each protocol CSV")


def add_attack_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    attack = parser.add_argument_group("attacks on the erasure (text-to-image; judged as forget_acc, in report.json's attacks)")
    attack.add_argument("--attack", dest="attacks", type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
                        default=[], required=required, metavar="NAMES",
                        help="comma-separated: unlearndiffatk (adversarial prompt tokens), ringabell (a concept vector in "
                        "the text embedding), relearn (a few fine-tuning steps on the concept's images); each reports "
                        "pre- and post-attack success rates")
    attack.add_argument("--attack-set", dest="attack_settings", action="append", type=parse_setting, default=[],
                        metavar="ATTACK.KEY=VALUE", help="an attack's budget, e.g. unlearndiffatk.iterations=10, "
                        "relearn.steps=50, ringabell.strength=3 (repeatable)")


def attack_settings(args: argparse.Namespace) -> dict:
    """The ForgetJob fields set by ``add_attack_arguments``' options."""
    return {"attacks": list(dict.fromkeys(args.attacks)), "attack_settings": dict(args.attack_settings)}


def read_prompt_file(path: str | None, option: str) -> list[str]:
    """The prompts in ``path``, one per line (blank lines and # comments skipped); [] without a path."""
    if path is None:
        return []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {option} {path} ({type(exc).__name__}); pass a text file with one prompt per line") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise UserError(f"{option} {path} holds no prompt; write one prompt per line")
    return prompts


def concept_settings(args: argparse.Namespace) -> dict:
    """The ForgetJob fields set by ``add_concept_arguments``'s options."""
    return {"concepts": [*args.concepts, *read_prompt_file(args.concept_prompts, "--concept-prompts")],
            "anchor": args.anchor,
            "retain_prompts": read_prompt_file(args.retain_prompts, "--retain-prompts"),
            "paraphrase_prompts": read_prompt_file(args.paraphrase_prompts, "--paraphrase-prompts"),
            "i2p_prompts": args.i2p_prompts, "nudity_threshold": args.nudity_threshold, "coco_prompts": args.coco_prompts,
            "coco_images": args.coco_images, "clip_model": args.clip_model, "protocol_rows": args.protocol_rows,
            "export_lora_rank": args.export_lora_rank}


def run_name(classes: list[str], subclasses: list[str], fraction: float | None, concepts: list[str]) -> str:
    """What a default output folder calls the forgotten part: ``3``, ``square``, ``random0.1``,
    ``a-handwritten-digit-three``."""
    if concepts:
        return re.sub(r"[^a-z0-9]+", "-", concepts[0].lower()).strip("-")[:40] or "concept"
    named = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(map(str, classes or subclasses))).strip("-")[:40]
    return named or f"random{fraction}"


def add_generator_evaluation_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The options of how diffusion models are evaluated (sampling protocol, judge, FID); returns their group."""
    evaluation = parser.add_argument_group("evaluation of diffusion models (same protocol before and after)")
    evaluation.add_argument("--eval-samples", type=int, default=100, help="samples per class (default 100)")
    evaluation.add_argument("--eval-steps", type=int, help="sampling steps (default: the preset's)")
    evaluation.add_argument("--eval-guidance", type=float, help="classifier-free guidance scale s (1 = none; default: the preset's)")
    evaluation.add_argument("--eval-classifier",
                            help="classifier that judges the samples: a classifier preset trained on the real data, or a "
                            "timm ImageNet model name / hf-hub: id (default: the preset's)")
    evaluation.add_argument("--eval-classifier-weights", metavar="PATH",
                            help="local weights for --eval-classifier (.safetensors/.pt, or a folder with model.safetensors)")
    evaluation.add_argument("--remain-classes", type=int, metavar="N",
                            help="evaluate (and, data-free, retain) N other classes chosen by --seed instead of all "
                            "(default: the preset's; dit-xl: 10)")
    evaluation.add_argument("--fid-features", default="classifier",
                            help="FID features: classifier (the judge's pre-logits; default, offline), inception (the FID "
                            "Inception-v3; needs its weights, see --fid-inception-weights), or a timm model name (hub weights)")
    evaluation.add_argument("--fid-library", choices=["torchmetrics", "clean-fid"], default="torchmetrics",
                            help="which library computes the Fréchet distance from the features (default torchmetrics)")
    evaluation.add_argument("--fid-inception-weights", metavar="PATH",
                            help="pt_inception-2015-12-05-6726825d.pth (default: torch's hub cache, ~/.cache/torch/hub/checkpoints)")
    return evaluation


FORGET_DESCRIPTION = (
    "Make a trained classifier forget a class (or a random subset, or a sub-class), a class-conditional diffusion "
    "model forget a class, or a text-to-image model (Stable Diffusion) erase a concept given as prompts (--concept); "
    "evaluate before and after; write the unlearned weights and report.json/report.md "
    "(diffusion: also sample grids) to --output-dir. The original weights are never modified. Run it with "
    "`accelerate launch` for several processes or GPUs."
)
SWEEP_DESCRIPTION = (
    "Run the forget job once per cell of a grid of method settings (--set KEY=V1,V2,... per axis; every combination) "
    "and per --seeds, each into OUTPUT_DIR/<cell>/seed-S (finished runs are reused, so a killed sweep continues), then "
    "write sweep.md and sweep.json (forget_acc, FID ratio or retain/test accuracy, steps; mean ± std over seeds) and "
    "heatmap.png. With --target, cells meeting every target are framed, and robust ones (every grid neighbour meets "
    "them too) starred: pick defaults there, not on the edge of the window. Takes every option of `genunlearn forget`."
)


def forget_parser(sweep: bool = False, prog: str = "genunlearn forget") -> argparse.ArgumentParser:
    """The forget job's options; ``sweep``: ``genunlearn sweep``'s, where --set takes grid axes and --target is added."""
    parser = Parser(prog="genunlearn sweep" if sweep else prog, description=SWEEP_DESCRIPTION if sweep else FORGET_DESCRIPTION,
                    epilog=UNDERSCORE_NOTE)
    add_model_arguments(parser)
    add_target_arguments(parser, "what to forget (exactly one)")
    add_concept_arguments(parser)
    add_attack_arguments(parser)
    parser.add_argument("--method", default="sfron", help="unlearning method (see `genunlearn methods`; default: sfron)")
    parser.add_argument("--output-dir", type=Path, help="run folder (default: outputs/<model>-<class>-<method>)")
    parser.add_argument("--steps", "--max_train_steps", type=int, help="unlearning steps (default: the preset's setting for the method)")
    parser.add_argument("--lr", "--learning_rate", type=float, help="learning rate")
    parser.add_argument("--batch-size", "--train_batch_size", type=int, help="batch size per process")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, data order and random labels (default 0)")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="S",
                        help="run once per seed (replaces --seed) into OUTPUT_DIR/seed-S and write summary.md/json with "
                        "the mean ± std of every figure; finished seeds are reused")
    parser.add_argument("--log-every", type=int, help="log figures every N steps")
    parser.add_argument("--checkpoint-every", "--checkpointing_steps", type=int,
                        help="write a resumable checkpoint every N steps (0: never)")
    parser.add_argument("--checkpoints-total-limit", type=int, metavar="N", help="keep the newest N checkpoints (default 2)")
    if not sweep:
        hub = parser.add_argument_group("sharing (as diffusers' training scripts)")
        hub.add_argument("--push-to-hub", action="store_true",
                         help="upload the finished run folder (model card, weights, reports, figures; not checkpoints) to a "
                         "Hugging Face Hub model repo")
        hub.add_argument("--hub-model-id", metavar="ORG/NAME", help="the repo to create or update (default: the output folder's name)")
        hub.add_argument("--hub-token", help="a Hub token (default: the one `hf auth login` saved)")
    if sweep:
        parser.add_argument("--set", dest="axes", type=parse_axis, nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                            help="grid axes: a method setting and its values, e.g. --set mask_threshold=1,2,3 lr=5e-5,1e-4")
        parser.add_argument("--target", dest="targets", type=parse_target, nargs="+", action="extend", default=[],
                            metavar="FIGURE<=X", help="what a cell must reach (mean over seeds), e.g. --target 'forget_acc<=0.05' "
                            "'fid_ratio<=1.15' (quoted: <= is a shell redirection; figures: forget_acc, fid_ratio, remain_acc, retain_acc, test_acc, steps)")
    else:
        parser.add_argument("--set", dest="settings", type=parse_setting, action="append", default=[], metavar="KEY=VALUE",
                            help="any other method setting, e.g. --set forget_weight=2 (repeatable)")
    parser.add_argument("--data-free", action="store_true",
                        help="diffusion: forget and retain sets are the model's own samples (generated once, cached)")
    parser.add_argument("--data-free-samples", type=int, default=100, help="generated training samples per class (default 100)")
    parser.add_argument("--data-free-guidance", type=float, metavar="S",
                        help="text-to-image: classifier-free guidance of the generated training samples (default: the "
                             "evaluation's, --eval-guidance)")
    evaluation = add_generator_evaluation_arguments(parser)
    evaluation.add_argument("--compare-retrain", action="store_true",
                            help="also train (or reuse, cached) the retrain oracle and report every metric's gap to it")
    evaluation.add_argument("--relearn-steps", type=int, default=0, metavar="N",
                            help="relearning check: fine-tune the unlearned model and the retrain oracle on a few forget "
                            "samples for N steps and report how fast the class comes back (0: off)")
    evaluation.add_argument("--relearn-samples", type=int, default=8, help="forget samples the relearning check uses (default 8)")
    evaluation.add_argument("--relearn-lr", type=float, help="relearning learning rate (default: the preset's pretraining lr)")
    memory = parser.add_argument_group("memory (large models)")
    add_precision_arguments(memory)
    memory.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass: much less memory, about a third slower")
    memory.add_argument("--lora-rank", "--lora_rank", type=int, metavar="R",
                        help="train rank-R LoRA factors instead of full weights (esd, finetune, grad_ascent, random_label; "
                        "peft), merged into the output; a text-to-image run also writes them to RUN/lora")
    memory.add_argument("--lora-targets", "--lora_targets", metavar="SCOPE",
                        help="the parameter scope whose Linear and Conv2d layers get the LoRA factors (default: esd's "
                        "--set scope, all layers for the others), e.g. cross-attention")
    parser.add_argument("--report-to", metavar="TRACKER",
                        help="also log the run's figures to an experiment tracker through accelerate: tensorboard "
                        "(pip install 'genunlearn[tensorboard]'; OUTPUT_DIR/logs/), wandb, all (every installed one), "
                        "or none (default); any tracker accelerate knows (mlflow, aim, ...) works too")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more detail (progress is written to OUTPUT_DIR/run.log either way; off a terminal, as lines)")
    parser.add_argument("--resume_from_checkpoint", "--resume-from-checkpoint", dest="resume", metavar="latest|PATH",
                        help="continue the unfinished run in --output-dir from its newest checkpoint (latest) or from one "
                        "of its checkpoints (OUTPUT_DIR/checkpoints/checkpoint-N); --lr, --steps and logging may change")
    return parser


def add_precision_arguments(group) -> None:
    """``--mixed-precision`` and ``--tf32``: the run's numerics, explicit and the same for the model before and after."""
    from genunlearn.precision import MIXED_PRECISIONS

    group.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default="no",
                       help="autocast forward passes, before and after alike: no (default: fp32, whatever the launcher "
                       "says), fp16 (GPU), bf16, or auto (the launcher's, e.g. accelerate launch --mixed_precision bf16); "
                       "weights, optimizer and the saved model stay fp32")
    group.add_argument("--tf32", action="store_true",
                       help="let float32 matrix products and convolutions run in TF32 on NVIDIA GPUs (default: off, "
                       "IEEE float32)")


def generator_evaluation_settings(args: argparse.Namespace) -> dict:
    """The ForgetJob fields set by ``add_generator_evaluation_arguments``'s options."""
    return {key: getattr(args, key) for key in ("eval_samples", "eval_steps", "eval_guidance", "eval_classifier",
                                                "eval_classifier_weights", "remain_classes", "fid_features", "fid_library",
                                                "fid_inception_weights")}


def model_and_weights(args: argparse.Namespace) -> tuple[str, str | None]:
    """``(model, pretrained)`` the options name: ``--pretrained FOLDER`` alone is the model, read from its config."""
    if args.model is not None:
        return args.model, args.pretrained
    if args.pretrained is None:
        raise UserError("pass --model (a preset, see `genunlearn models`) or --pretrained MODEL_FOLDER")
    if not Path(args.pretrained).is_dir():
        raise UserError(f"--pretrained {args.pretrained} is not a model folder; with a weights file or hub id, also pass "
                        "--model (its architecture: a preset, a preset YAML or a timm name)")
    return args.pretrained, None


def target_ids(args: argparse.Namespace, model: str, pretrained: str | None) -> tuple[list[int], list[int]]:
    """``(classes, subclasses)`` as ids: ``--class``/``--subclass`` tokens, names looked up in the labels the run
    will see (``data.class_names``)."""
    from genunlearn.data.class_names import class_ids, held_class_names

    def ids(tokens: list[str], subclasses: bool) -> list[int]:
        if all(token.isdigit() for token in tokens):
            return [int(token) for token in tokens]
        names = held_class_names(model, pretrained, args.data, subclasses=subclasses)
        return class_ids(tokens, names, "sub-class" if subclasses else "class")

    return ids(args.classes, False), ids(args.subclasses, True)


def model_label(model: str) -> str:
    """``--model`` as one folder-name part under ``outputs/``: a preset file's stem, a model folder's name, a hub id's
    ``/`` as ``--``."""
    if model.endswith((".yaml", ".yml")) or Path(model).is_dir():
        return Path(model).resolve().name if Path(model).is_dir() else Path(model).stem
    return model.replace("/", "--")


def job_from_args(args: argparse.Namespace, settings: dict, prefix: str = "", suffix: str = ""):
    """The ForgetJob that ``forget_parser``'s options describe (``settings``: the method settings they set; the
    default output folder is outputs/<prefix><model>-<forgotten>-<method>[-datafree]<suffix>)."""
    from genunlearn.runs.job import ForgetJob

    settings = {**{k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("batch_size", args.batch_size),
                                      ("log_every", args.log_every), ("checkpoint_every", args.checkpoint_every),
                                      ("keep_checkpoints", args.checkpoints_total_limit), ("lora_rank", args.lora_rank),
                                      ("lora_targets", args.lora_targets)) if v is not None},
                **settings}
    concepts = concept_settings(args)
    model, pretrained = model_and_weights(args)
    classes, subclasses = target_ids(args, model, pretrained)
    forgotten = run_name(args.classes, args.subclasses, args.random_fraction, concepts["concepts"])
    return ForgetJob(
        model=model,
        method=args.method,
        output_dir=args.output_dir
        or Path("outputs") / f"{prefix}{model_label(model)}-{forgotten}-{args.method}{'-datafree' if args.data_free else ''}{suffix}",
        classes=classes,
        random_fraction=args.random_fraction,
        subclasses=subclasses,
        settings=settings,
        pretrained=pretrained,
        data=args.data,
        cache_dir=args.cache_dir,
        seed=args.seed,
        resume=True if args.resume == "latest" else args.resume or False,
        data_free=args.data_free,
        data_free_samples=args.data_free_samples,
        data_free_guidance=args.data_free_guidance,
        **generator_evaluation_settings(args),
        compare_retrain=args.compare_retrain,
        relearn_steps=args.relearn_steps,
        relearn_samples=args.relearn_samples,
        relearn_lr=args.relearn_lr,
        mixed_precision=args.mixed_precision,
        tf32=args.tf32,
        gradient_checkpointing=args.gradient_checkpointing,
        report_to=args.report_to,
        **concepts,
        **attack_settings(args),
    )


def forget_main(argv: Sequence[str] | None = None) -> int:
    args = forget_parser(prog=program("forget", argv)).parse_args(argv)  # before the heavy imports: --help is instant
    from genunlearn.eval.report import SUMMARY_KEYS, summary_line
    from genunlearn.eval.seeds import summary_line as seeds_summary_line
    from genunlearn.progress import configure_console
    from genunlearn.runs.forget import run_forget_job, run_seeds

    configure_console(args.verbose - args.quiet)
    job = job_from_args(args, dict(args.settings), suffix="-seeds" if args.seeds else "")
    if args.seeds and args.push_to_hub:
        raise UserError("--push-to-hub uploads one run; push a seed's folder (OUTPUT_DIR/seed-S) after the runs instead")
    if args.seeds:
        summary = run_seeds(job, args.seeds)
        if _is_main_process():
            print(seeds_summary_line(summary, job.output_dir, SUMMARY_KEYS[summary["kind"]]))
        return 0
    report = run_forget_job(job)
    if _is_main_process():
        print(summary_line(report, job.output_dir))
        if args.push_to_hub:
            from genunlearn.runs.hub import push_run

            print(f"pushed {job.output_dir} to {push_run(job.output_dir, args.hub_model_id, args.hub_token)}")
    return 0


def sweep_main(argv: Sequence[str] | None = None) -> int:
    args = forget_parser(sweep=True).parse_args(argv)
    from genunlearn.distributed import make_accelerator
    from genunlearn.progress import configure_console
    from genunlearn.runs.sweep import run_sweep

    configure_console(args.verbose - args.quiet)
    job = job_from_args(args, {}, prefix="sweep-")
    sweep = run_sweep(job, args.axes, args.seeds or [args.seed], args.targets, make_accelerator(mixed_precision=job.mixed_precision, tf32=job.tf32))
    if _is_main_process():
        robust = [c["folder"] for c in sweep["cells"] if c["robust"]]
        verdict = f"; robust cells: {', '.join(robust)}" if robust else "; no robust cell" if args.targets else ""
        print(f"swept {len(sweep['cells'])} cells x {len(sweep['seeds'])} seed(s){verdict}; wrote {job.output_dir}/sweep.md and heatmap.png")
    return 0


ATTACK_DESCRIPTION = (
    "Attack an erased text-to-image pipeline (--attacked, e.g. a run's pipeline/; --model and --pretrained name the "
    "original it was erased from): its figures as `genunlearn evaluate` measures them, then each --attack on --concept's "
    "prompts, scored by the same judge (pre- and post-attack success rates, sample size, budget). The original's "
    "generations of the concept are the attacks' images (UnlearnDiffAtk's targets, relearning's data). Writes "
    "evaluation.json and evaluation.md with an attacks section to --output-dir.")


def evaluate_parser(attack: bool = False) -> argparse.ArgumentParser:
    parser = Parser(
        prog="genunlearn attack" if attack else "genunlearn evaluate", epilog=UNDERSCORE_NOTE,
        description=ATTACK_DESCRIPTION if attack else
        "Evaluate a model as it is, without unlearning, with a forget run's metrics and protocol: "
        "classifiers: accuracy on all train/test images and per class; diffusion models: samples of every class judged "
        "by the evaluation classifier, FID against real images (per class and pooled), a sample grid. Name a forgotten "
        "part to get its figures separately (e.g. evaluate a run's unlearned pipeline with --class 3). Writes "
        "evaluation.json and evaluation.md (diffusion: samples.png) to --output-dir.",
    )
    add_model_arguments(parser)
    add_target_arguments(parser, "forgotten part (optional; at most one)")
    add_concept_arguments(parser)
    if attack:
        add_attack_arguments(parser, required=True)
        parser.add_argument("--attacked", required=True, metavar="DIR",
                            help="the erased pipeline folder to attack (a run's pipeline/); --model/--pretrained name its "
                            "original, whose generations are the attacks' images of the concept")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling and the split (default 0)")
    parser.add_argument("--output-dir", type=Path, help="where to write (default: outputs/evaluate-<model>)")
    add_precision_arguments(parser)
    add_generator_evaluation_arguments(parser)
    return parser


def attack_main(argv: Sequence[str] | None = None) -> int:
    return evaluate_main(argv, attack=True)


def evaluate_main(argv: Sequence[str] | None = None, attack: bool = False) -> int:
    args = evaluate_parser(attack).parse_args(argv)
    from genunlearn.progress import configure_console
    from genunlearn.runs.evaluate import run_evaluation
    from genunlearn.runs.job import ForgetJob

    configure_console()
    model, pretrained = model_and_weights(args)
    classes, subclasses = target_ids(args, model, pretrained)
    folder = f"{'attack' if attack else 'evaluate'}-{model_label(model)}"
    job = ForgetJob(model=model, method="none", output_dir=args.output_dir or Path("outputs") / folder,
                    classes=classes, random_fraction=args.random_fraction, subclasses=subclasses,
                    pretrained=pretrained, data=args.data, cache_dir=args.cache_dir, seed=args.seed,
                    mixed_precision=args.mixed_precision, tf32=args.tf32, **generator_evaluation_settings(args),
                    **concept_settings(args), **({**attack_settings(args), "attacked": args.attacked} if attack else {}))
    evaluation = run_evaluation(job)
    if _is_main_process():
        figures = ", ".join(f"{k} {v:.3f}" for k, v in evaluation["metrics"].items()
                            if isinstance(v, (int, float)) and not k.endswith("_time_s") and not k.endswith("_ink"))
        attacks = "".join(f"; {name} ASR {a['pre_asr']:.2f} -> {a['post_asr']:.2f}" for name, a in evaluation.get("attacks", {}).items())
        print(f"{evaluation['model']}: {figures}{attacks}; wrote {job.output_dir}/evaluation.md")
    return 0


def pretrain_parser(prog: str = "genunlearn pretrain") -> argparse.ArgumentParser:
    parser = Parser(
        prog=prog, epilog=UNDERSCORE_NOTE,
        description="Train a preset from scratch on its data (or --data) and cache it, or write it to --output-dir.",
    )
    parser.add_argument("--model", required=True, help="a preset (see `genunlearn models`) or a timm model name")
    parser.add_argument("--data", help="image-folder dataset ROOT/{train,test}/<class>/*.png instead of the preset's data; "
                        "text-to-image: images captioned with the concept's or retain prompts (metadata.jsonl of "
                        "file_name and text, the imagefolder layout), trained on instead of generations of those prompts")
    parser.add_argument("--cache-dir", help="cache to fill (default: $GENUNLEARN_CACHE, else ~/.cache/genunlearn)")
    parser.add_argument("--output-dir", type=Path, help="also write model.safetensors + config.json here")
    return parser


def pretrain_main(argv: Sequence[str] | None = None) -> int:
    args = pretrain_parser(program("pretrain", argv)).parse_args(argv)
    from genunlearn.progress import configure_console
    from genunlearn.runs.pretrain import run_pretrain

    configure_console()
    summary = run_pretrain(args.model, data=args.data, cache_dir=args.cache_dir, output_dir=args.output_dir)
    if _is_main_process():
        print(summary)
    return 0


def methods_main(argv: Sequence[str] | None = None) -> int:
    from genunlearn.methods import METHODS, get_method
    from genunlearn.methods.registry import method_settings

    parser = Parser(prog="genunlearn methods", description="List the unlearning methods, or show one method's settings: "
                    "each default (its source is the config class's docstring) and what --model's preset sets instead.")
    parser.add_argument("name", nargs="?", help="a method: print its settings and defaults")
    parser.add_argument("--model", help="also show this preset's settings for the method")
    args = parser.parse_args(argv)
    if args.name is None:
        for name, spec in sorted(METHODS.items()):
            print(f"{name:14s} {spec.summary}")
        return 0
    spec = get_method(args.name)
    print(f"{spec.name}: {spec.summary}\n\n{' '.join((spec.config_class.__doc__ or '').split())}\n")
    for key, default, preset_value in method_settings(spec, args.model):
        print(f"  {key:22s} {default!r:>14}" + ("" if preset_value is None else f"   {args.model}: {preset_value!r}"))
    return 0


def models_main(argv: Sequence[str] | None = None) -> int:
    from genunlearn.models.presets import list_presets

    argparse.ArgumentParser(prog="genunlearn models", description="List the model presets.").parse_args(argv)
    for name, description in list_presets().items():
        print(f"{name:18s} {description}")
    print("(also: any timm model name with --data, e.g. --model resnet50, at timm's input size and normalisation; a preset "
          "YAML file; or a model folder alone: --pretrained MY_MODEL_DIR, see docs/presets.md)")
    return 0


def compare_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genunlearn compare",
                                     description="One table of several runs' headline figures (before -> after).")
    parser.add_argument("runs", nargs="+", type=Path, help="run folders written by `genunlearn forget`")
    parser.add_argument("--output", type=Path, help="also write OUTPUT.md and OUTPUT.png (a bar plot per figure); "
                        "refused if either exists")
    args = parser.parse_args(argv)
    from genunlearn.eval.compare import comparison_table, load_reports, save_comparison_plot
    from genunlearn.storage.files import atomic_write_text

    if args.output is not None:
        existing = [path for path in (args.output.with_suffix(".md"), args.output.with_suffix(".png")) if path.exists()]
        if existing:
            raise UserError(f"{existing[0]} exists and would be replaced; choose another --output (nothing is overwritten)")
    reports = load_reports(args.runs)
    table = comparison_table(args.runs, reports)
    print(table)
    if args.output is not None:
        atomic_write_text(args.output.with_suffix(".md"), table + "\n")
        save_comparison_plot(args.runs, reports, args.output.with_suffix(".png"))
        print(f"wrote {args.output.with_suffix('.md')} and {args.output.with_suffix('.png')}")
    return 0


COMMANDS: dict[str, tuple[Callable[[Sequence[str] | None], int], str]] = {
    "forget": (forget_main, "make a model forget a class and report before/after (same as scripts/forget_class.py)"),
    "sweep": (sweep_main, "the forget job over a grid of --set values: a heat-map and table per cell (forget_acc, FID ratio, steps)"),
    "evaluate": (evaluate_main, "evaluate a model as it is (no unlearning): the forget run's metrics, FID, sample grid"),
    "attack": (attack_main, "attack a text-to-image model (unlearndiffatk, ringabell, relearn): pre/post attack success rates"),
    "pretrain": (pretrain_main, "train a preset from scratch and cache it (same as scripts/pretrain.py)"),
    "compare": (compare_main, "one table and plot of several runs' reports"),
    "methods": (methods_main, "list the unlearning methods, or one method's settings and defaults (genunlearn methods NAME)"),
    "models": (models_main, "list the model presets"),
}


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _report(message: str) -> None:
    """Print ``message`` to stderr from the main process, on a line of its own: progress bars left open by the failed
    work are closed first."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    if _is_main_process():
        print(message, file=sys.stderr)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is ``torch.OutOfMemoryError`` (GPU allocations; a CPU machine's OOM kills the process instead);
    torch is not imported to ask (a failure before it was loaded is not one)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)  # a full disk, no permission


def guarded(entry: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a command; bad input becomes one ``error:`` line and exit code 2, never a traceback."""
    from genunlearn.progress import configure_console

    configure_console(libraries=False)  # each command configures the libraries' bars after parsing its options
    try:
        return entry(argv)
    except UserError as exc:
        _report(f"error: {exc}")
        return EXIT_USER_ERROR
    except OSError as exc:
        if exc.errno not in WRITE_FAILURES:
            raise
        _report(f"error: cannot write {exc.filename or 'a file'} ({exc.strerror}); free disk space or choose a writable "
                "--output-dir / --cache-dir (finished files and checkpoints are kept)")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _report("interrupted; continue with --resume_from_checkpoint latest (if checkpoints were on)")
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        _report("error: out of memory; lower --batch-size, add --gradient-checkpointing, use --mixed-precision bf16 "
                "(or fp16), spread the batch over more GPUs with accelerate launch, or shard the model over them "
                "(--config_file configs/accelerate/fsdp.yaml)")
        return EXIT_USER_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        from genunlearn import __version__

        print(f"genunlearn {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        print("usage: genunlearn COMMAND [options]   (genunlearn COMMAND --help for each; genunlearn --version)\n")
        for name, (_, summary) in COMMANDS.items():
            print(f"  {name:10s} {summary}")
        return 0 if argv and argv[0] in ("-h", "--help") else EXIT_USER_ERROR
    return guarded(COMMANDS[argv[0]][0], argv[1:])
