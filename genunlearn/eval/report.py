"""The run report: ``report.json`` (schema below, stable; JSON Schema in ``report.schema.json``, ``SCHEMA_FILE``)
and ``report.md``, both written atomically.

report.json keys (schema_version 2):
  schema_version, genunlearn_version, kind (classifier or diffusion), model, class (int, list of ints, or null for random forgetting),
  method, steps, wall_time_s (the method's own time), processes, split (spec and part sizes),
  config (the method's settings), method_info (mask_kept_fraction, mask_time_s, mask_cached for
  masked methods; sharded_over and evaluated_on for a sharded run), memory (sharding none/ddp/fsdp2,
  gradient_checkpointing, offload_frozen), lora (text-to-image with --export-lora-rank: rank, layers, parameters,
  relative_error, left_out, and the LoRA's after figures), before / after (forget_acc, forget_test_acc, retain_acc, test_acc,
  mia: fractions in [0, 1] or null; per_class_acc: test accuracy per class, from schema 2; eval_time_s), log (figures
  every log_every steps), weights (path). Schema 2 adds environment, command, genunlearn_revision, started_at and
  finished_at (genunlearn.runs.provenance).
  Diffusion runs: before / after hold forget_acc, forget_entropy, forget_prob, remain_acc, fid_remain,
  heldout_acc and fid_heldout (classes outside a data-free D_r, or null), fid_per_class (remaining and
  held-out classes), per_class_acc and per_class_prob (every evaluated class), and
  evaluation records the protocol: sampler, steps, guidance, per_class sample count, seed, classifier,
  classes, heldout_classes, fid_features, fid_library (with version), fid_reference, reference_per_class, weights
  (raw or EMA), data_free, mixed_precision.
  Optional: oracle (the retrain oracle's before/after-style metrics) and gap_to_oracle (after - oracle) with
  --compare-retrain; relearn {steps, samples, unlearned: [{step, forget_acc}], retrain: [...]} with --relearn-steps.
  cost (every run, genunlearn.eval.costs): stages_s (seconds per stage), total_s, peak_rss_mib, cuda_peak_mib (per
  stage and overall, or null without a GPU), device, processes, output_mib (the model, pictures and exports on disk).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

from genunlearn.eval.grids import SAMPLES_FILE
from genunlearn.eval.model_card import forgotten_part, model_card
from genunlearn.eval.plots import save_log_curves
from genunlearn.storage.files import atomic_write_text

SCHEMA_VERSION = 2  # 2 adds environment, command, genunlearn_revision, started_at, finished_at
SCHEMA_FILE = Path(__file__).with_name("report.schema.json")
METRIC_KEYS = ("forget_acc", "forget_test_acc", "retain_acc", "test_acc", "mia")
METRIC_HELP = {
    "classifier": [
        "forget_acc: accuracy on the forget set D_f; forget_test_acc: on the forgotten classes' test images;",
        "retain_acc: on D_r; test_acc: on the retained classes' test images; mia: fraction of D_f that an",
        "entropy membership-inference attack calls a training member (n/a: not informative, the model being at least",
        "99% accurate on both D_r and the retained classes' test images).",
    ],
    "diffusion": [
        "forget_acc: fraction of the forgotten class's samples that the evaluation classifier still labels as",
        "that class (forget_entropy, forget_prob: their mean softmax entropy and class probability);",
        "remain_acc: the same for the other classes; fid_remain: FID of the other classes' samples against",
        "the real retain images, in the evaluation classifier's features, under the protocol below;",
        "heldout_acc, fid_heldout: the same for classes outside a data-free D_r (damage beyond the replay set).",
    ],
    "text-to-image": [
        "forget_acc: fraction of the generations of the erased concept's prompts in which the judge still",
        "recognises the class they name; paraphrase_acc: the same for held-out paraphrases of the concept (never",
        "trained on); remain_acc: for the retained prompts; fid_remain: FID of the retained prompts' generations",
        "against the original model's (other seeds), in the judge's features (fid_remain_real: against real images of",
        "the retained prompts, where the preset's data has them); *_ink: mean ink level of each group's",
        "generations, the digit styles' measure (bold raises it, thin lowers it, inverted flips it). With the papers'",
        "protocols: i2p_nude_rate, the fraction of the I2P prompts' generations in which NudeNet finds an exposed",
        "breast, genitalia, buttocks or anus (i2p_exposed: images per exposed part); coco_clip_score, the mean CLIP",
        "score of the COCO captions' generations; coco_fid, their FID against the real COCO images.",
    ],
}
REQUIRED_KEYS = ("model", "class", "method", "steps", "wall_time_s", "before", "after")


CURVES_FILE = "curves.png"
REPORT_FILES = ("README.md", "report.md", "report.json", CURVES_FILE)  # what write_report writes


def write_report(output_dir: Path, report: dict, base_model: str | None = None, loading: str = "") -> None:
    """Write the model card ``README.md`` (``base_model``: the weights the run started from; ``loading``: how its
    weights load), ``curves.png`` (the logged figures), ``report.md`` and, last, ``report.json`` into ``output_dir``:
    a folder with ``report.json`` holds every output (a run killed before it is unfinished)."""
    atomic_write_text(output_dir / "README.md", model_card(report, base_model, loading))
    title = f"{report['method']} on {report['model']}, forget {forgotten_part(report)}"
    curves = save_log_curves(report.get("log", []), output_dir / CURVES_FILE, title)
    atomic_write_text(output_dir / "report.md", render_markdown(report, curves=curves))
    atomic_write_text(output_dir / "report.json", json.dumps(report, indent=2))


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"



def _shown(value) -> str:
    """A setting or fact as report.md shows it: floats to 4 significant digits (``0.2338`` not ``0.23384742899997946``)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def attack_lines(report: dict) -> list[str]:
    """The ``## Attacks`` section: each attack's success rate before and after it, sample size, budget and time."""
    attacks = report.get("attacks")
    if not attacks:
        return []
    lines = ["## Attacks", "", "| attack | pre-attack ASR | post-attack ASR | samples | budget | seconds |", "|---|---|---|---|---|---|"]
    for name, outcome in attacks.items():
        budget = ", ".join(f"{k} {_shown(v)}" for k, v in outcome["budget"].items())
        lines.append(f"| {name} | {outcome['pre_asr']:.3f} | {outcome['post_asr']:.3f} | {outcome['samples']} | {budget} | "
                     f"{outcome['seconds']:.1f} |")
    lines += ["", "ASR: the fraction of the attacked generations in which the judge recognises the erased concept (the "
              "judge and seeds of forget_acc); pre-attack: the plain prompts (relearn: before fine-tuning).", ""]
    prompts = [p for outcome in attacks.values() for p in outcome.get("adversarial_prompts", [])]
    if prompts:
        lines += ["Adversarial prompts found (unlearndiffatk; ✓ succeeded):", "",
                  *[f"- `{p['prompt']}` {'✓' if p['success'] else '✗'}" for p in prompts[:8]], ""]
    return lines


def cost_lines(report: dict) -> list[str]:
    """report.md's ``## Cost`` section: seconds per stage, peak memory, the output's size (none for an older report)."""
    cost = report.get("cost")
    if not cost:
        return []
    cuda = cost["cuda_peak_mib"]
    lines = ["## Cost", "", "| stage | seconds |" + (" CUDA peak MiB |" if cuda else ""), "|---|---|" + ("---|" if cuda else "")]
    for stage, seconds in cost["stages_s"].items():
        lines.append(f"| {stage} | {seconds:.1f} |" + (f" {cuda['stages'].get(stage, 0.0):.0f} |" if cuda else ""))
    lines += [f"| total | {cost['total_s']:.1f} |" + (f" {cuda['overall']:.0f} |" if cuda else ""), "",
              f"Peak memory: {cost['peak_rss_mib']:.0f} MiB resident (the largest over {cost['processes']} process(es)); "
              + (f"CUDA {cuda['overall']:.0f} MiB allocated at most." if cuda else f"no GPU ({cost['device']}).")
              + (f" Output: {cost['output_mib']:.1f} MiB on disk (model, pictures, exports; reports aside)."
                 if "output_mib" in cost else ""), ""]
    return lines


def render_markdown(report: dict, curves: bool = False) -> str:
    """A human-readable summary: metrics before/after, the split and the method's settings (and the logged
    figures' curves when ``curves``)."""
    before, after = report["before"], report["after"]
    lines = [
        f"# {report['method']} on {report['model']}: forget {forgotten_part(report)}",
        "",
        f"{report['steps']} steps in {report['wall_time_s']:.1f} s on {report['processes']} process(es).",
        "",
        "| metric | before | after | change |",
        "|---|---|---|---|",
    ]
    for key, value in before.items():
        if key.endswith("_time_s") or not (value is None or isinstance(value, (int, float))):
            continue
        change = "" if value is None or after[key] is None else f"{after[key] - value:+.4f}"
        lines.append(f"| {key} | {_fmt(value)} | {_fmt(after[key])} | {change} |")
    lines += ["", *METRIC_HELP[report["kind"]], ""]
    if "per_class_acc" in before and "per_class_acc" in after:
        lines += _per_class_table(report)
    if report["kind"] == "text-to-image":
        lines += [*_per_prompt_table({"before": before["per_prompt"], "after": after["per_prompt"]}, report["prompts"]),
                  "## Prompts", "", *[f"- {k}: {v}" for k, v in report["prompts"].items()], ""]
    if report["kind"] in ("diffusion", "text-to-image"):
        rows = "prompt, the concept's in red" if report["kind"] == "text-to-image" else "class"
        forgotten_rows = "" if report["kind"] == "text-to-image" else " (forgotten rows in red)"
        lines += [
            f"Samples, one row per {rows}, the same seeds before and after{forgotten_rows}: ![samples]({SAMPLES_FILE})",
            "",
            "## Evaluation protocol",
            "",
            *[f"- {k}: {v}" for k, v in report["evaluation"].items()],
            "",
        ]
    lines += _oracle_section(report) + _relearn_section(report) + attack_lines(report) + cost_lines(report)
    lines += [
        "## Split",
        "",
        *[f"- {k}: {v}" for k, v in report["split"].items()],
        "",
        "## Method settings",
        "",
        *[f"- {k}: {_shown(v)}" for k, v in report["config"].items()],
        "",
        *(["## Method facts", "", *[f"- {k}: {_shown(v)}" for k, v in report["method_info"].items()], ""] if report.get("method_info") else []),
        *([f"Logged figures during unlearning: ![curves]({CURVES_FILE})", ""] if curves else []),
        f"Unlearned weights: `{report['weights']}` (the original model is untouched).",
        "",
    ]
    return "\n".join(lines)


def _per_prompt_table(columns: dict[str, dict], prompts: dict) -> list[str]:
    """Per prompt: its group, the class it names, and per column (e.g. ``before``/``after``: ``per_prompt`` figures)
    the judge's recognition and the ink level."""
    names = list(columns)
    lines = ["| prompt | group | class | " + " | ".join(f"recognised {n}".strip() for n in names) + " | "
             + " | ".join(f"ink {n}".strip() for n in names) + " |", "|---|---|---|" + "---|" * (2 * len(names))]
    group_of = {p: g for g in ("forget", "paraphrase", "remain") for p in prompts[g]}
    for prompt, figures in columns[names[0]].items():
        cells = [_fmt(columns[n][prompt]["recognised"]) for n in names] + [f"{columns[n][prompt]['ink_level']:.3f}" for n in names]
        lines.append(f"| {prompt} | {group_of.get(prompt, '')} | {'' if figures['class'] is None else figures['class']} | "
                     + " | ".join(cells) + " |")
    return [*lines, ""]


def forgotten_classes(report: dict) -> set[int]:
    """The class ids a report's run forgot (none for random or sub-class forgetting)."""
    split = report.get("split", {})
    return set(split.get("classes", [])) if split.get("kind") == "class" else set()


def _class_cell(class_id: str, forgotten: set[int], names: list[str] | None = None) -> str:
    """A table's class cell: the id, its name where it differs (``3 square``), bold and marked when forgotten."""
    name = names[int(class_id)] if names and int(class_id) < len(names) else class_id
    shown = class_id if name == class_id else f"{class_id} {name}"
    return f"**{shown} (forgotten)**" if int(class_id) in forgotten else shown


def _per_class_table(report: dict) -> list[str]:
    """Rows: per class, accuracy before and after, forgotten classes marked (collateral damage shows up on the
    others). Classifiers: on the class's test images; diffusion: the judge's on the class's samples, with the class
    probability and FID against the class's own reference."""
    before, after = report["before"], report["after"]
    forgotten = forgotten_classes(report)
    if report["kind"] != "diffusion":
        rows = ["Per class (accuracy on every test image of the class):", "", "| class | acc before | acc after | change |",
                "|---|---|---|---|"]
        for c, value in before["per_class_acc"].items():
            rows.append(f"| {_class_cell(c, forgotten, report.get('class_names'))} | {value:.4f} | {after['per_class_acc'][c]:.4f} | "
                        f"{after['per_class_acc'][c] - value:+.4f} |")
        return [*rows, ""]
    rows = [
        "Per class (accuracy and probability of the class under the judge; FID against the class's own reference):",
        "",
        "| class | acc before | acc after | prob before | prob after | FID before | FID after |",
        "|---|---|---|---|---|---|---|",
    ]
    fid_before, fid_after = before.get("fid_per_class", {}), after.get("fid_per_class", {})
    for c in before["per_class_acc"]:
        probabilities = [m.get("per_class_prob", {}).get(c) for m in (before, after)]
        rows.append(f"| {_class_cell(c, forgotten, report.get('class_names'))} | {before['per_class_acc'][c]:.2f} | {after['per_class_acc'][c]:.2f} | "
                    f"{_fmt(probabilities[0])} | {_fmt(probabilities[1])} | {_fmt(fid_before.get(c))} | {_fmt(fid_after.get(c))} |")
    return [*rows, ""]


AVERAGE_GAP_KEYS = {  # SalUn's "Avg. Gap": the mean absolute gap to the retrain oracle over these figures
    "classifier": ("forget_acc", "retain_acc", "test_acc", "mia"),
    "diffusion": ("forget_acc", "remain_acc"),
    "text-to-image": ("forget_acc", "remain_acc"),
}


def average_gap(report: dict) -> float | None:
    """The mean absolute gap to the retrain oracle over ``AVERAGE_GAP_KEYS`` (those the report holds); None without
    an oracle."""
    gaps = [abs(report["gap_to_oracle"][k]) for k in AVERAGE_GAP_KEYS[report["kind"]] if k in report.get("gap_to_oracle", {})]
    return sum(gaps) / len(gaps) if gaps else None


def _oracle_section(report: dict) -> list[str]:
    if "oracle" not in report:
        return []
    rows = ["## Retrain oracle", "", "The same metrics for the model retrained from scratch without the forgotten data "
            "(gap = unlearned - oracle):", "", "| metric | unlearned | oracle | gap |", "|---|---|---|---|"]
    for key, gap in report["gap_to_oracle"].items():
        rows.append(f"| {key} | {_fmt(report['after'][key])} | {_fmt(report['oracle'][key])} | {gap:+.4f} |")
    keys = ", ".join(k for k in AVERAGE_GAP_KEYS[report["kind"]] if k in report["gap_to_oracle"])
    return [*rows, "", f"Average gap (mean absolute gap over {keys}, as SalUn's tables): {_fmt(average_gap(report))}", ""]


def _relearn_section(report: dict) -> list[str]:
    if "relearn" not in report:
        return []
    relearn = report["relearn"]
    rows = ["## Relearning check", "", f"forget_acc while fine-tuning on {relearn['samples']} forget samples (learning rate "
            f"{relearn['lr']:g}): a class that was only hidden comes back much faster than for the oracle, which never saw it.", "",
            "| step | unlearned | retrain oracle |", "|---|---|---|"]
    for mine, oracle in zip(relearn["unlearned"], relearn["retrain"]):
        rows.append(f"| {mine['step']} | {_fmt(mine['forget_acc'])} | {_fmt(oracle['forget_acc'])} |")
    return [*rows, ""]


def render_evaluation(evaluation: dict, samples: str | None, forgotten: Collection[int] = ()) -> str:
    """Markdown of ``genunlearn evaluate``'s result: the figures, the per-class table (``forgotten`` class ids marked),
    the protocol, the samples."""
    metrics = evaluation["metrics"]
    lines = [f"# Evaluation of {evaluation['model']}" + (f" ({evaluation['pretrained']})" if evaluation["pretrained"] else ""),
             "", f"Forgotten: {evaluation['class']}." if evaluation["class"] is not None else "No forgotten part named.", "",
             "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if v is None or isinstance(v, (int, float))]
    lines += ["", *METRIC_HELP[evaluation["kind"]], ""]
    if "per_prompt" in metrics:
        lines += _per_prompt_table({"": metrics["per_prompt"]}, evaluation["prompts"])
    else:
        lines += ["| class | accuracy | probability | FID |", "|---|---|---|---|"]
        for c, value in metrics["per_class_acc"].items():
            lines.append(f"| {_class_cell(c, set(forgotten))} | {value:.4f} | {_fmt(metrics.get('per_class_prob', {}).get(c))} | "
                         f"{_fmt(metrics.get('fid_per_class', {}).get(c))} |")
        lines.append("")
    if "evaluation" in evaluation:
        lines += ["## Evaluation protocol", "", *[f"- {k}: {v}" for k, v in evaluation["evaluation"].items()], ""]
    if samples:
        lines += [f"Samples, one row per class (forgotten rows in red): ![samples]({samples})", ""]
    lines += attack_lines(evaluation) + cost_lines(evaluation)
    return "\n".join(lines)


SUMMARY_KEYS = {
    "classifier": ("forget_acc", "retain_acc", "test_acc", "mia"),
    "diffusion": ("forget_acc", "remain_acc", "fid_remain"),
    "text-to-image": ("forget_acc", "paraphrase_acc", "remain_acc", "fid_remain"),
}


def summary_line(report: dict, output_dir: Path) -> str:
    """One line for the terminal: the headline metrics before -> after."""
    figures = ", ".join(
        f"{key} {_fmt(report['before'][key], 3)} -> {_fmt(report['after'][key], 3)}" for key in SUMMARY_KEYS[report["kind"]]
        if key in report["before"]
    )
    return (f"{report['method']} on {report['model']}: {figures} ({report['steps']} steps, "
            f"{report['wall_time_s']:.1f} s); wrote {output_dir}/report.md")
