"""Concept erasure on a text-to-image preset over named settings ("rows") x seeds: one forget run per cell, as the
command line runs it (`genunlearn forget --model sd-digits --concept ... --seed S` with the row's options).

    python benchmarks/concept_erasure.py                                  # every row, seeds 0 1 2 (hours on a CPU)
    python benchmarks/concept_erasure.py --rows sfron salun --seeds 0     # some of them
    python benchmarks/concept_erasure.py --report-only                    # the table of the finished cells
    python benchmarks/concept_erasure.py --rows uce esd-u --attack        # and attack each erasure (ATTACK_BUDGET)

Each finished run leaves one small JSON in CELLS (default benchmarks/results/concept_erasure/cells, committed, so the
grid accumulates across sessions and machines; a rerun reuses it, and a cell of another row definition is refused).
The run folders (weights, pictures, report) go to OUTPUT/runs/MODEL, outside git. The docs' tables come from the committed
cells: ``python benchmarks/tables.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from genunlearn.data.captioned_digits import caption_images
from genunlearn.distributed import make_accelerator
from genunlearn.errors import UserError
from genunlearn.eval.seeds import mean_std
from genunlearn.runs.forget import run_forget_job
from genunlearn.runs.job import ForgetJob
from genunlearn.storage.files import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results" / "concept_erasure"
CONCEPT = "a handwritten digit three"
ANCHOR = "a handwritten digit four"
RETAIN = [f"a handwritten digit {word}" for word in ("zero", "one", "two", "four", "five", "six", "seven", "eight", "nine")]
# name: (method, job options, method settings, what it stands for)
ROWS: dict[str, tuple[str, dict, dict, str]] = {
    "sfron": ("sfron", {}, {}, "SFR-on, the references' settings"),
    "sfron-anchor": ("sfron", {"anchor": ANCHOR}, {}, "SFR-on, the reference's anchor"),
    "sfron-anchor-unguided": ("sfron", {"anchor": ANCHOR, "data_free_guidance": 1.0}, {},
                              "SFR-on, that anchor on unguided generations"),
    "sfron-batch8": ("sfron", {}, {"batch_size": 8}, "SFR-on, batch 8 (the script's default; its README runs 2)"),
    "sfron-unshuffled": ("sfron", {}, {"shuffle": False}, "SFR-on, the script's unshuffled loaders"),
    "sfron-held": ("sfron", {}, {"hold_masked": True}, "SFR-on, masked weights held (genunlearn before this version)"),
    "salun": ("salun", {}, {}, "SalUn, the references' settings (5 epochs over the generations)"),
    "salun-anchor": ("salun", {"anchor": ANCHOR}, {}, "SalUn, the reference's anchor"),
    "salun-real": ("salun", {"data": "real"}, {}, "SalUn on real captioned digits (the reference's data)"),
    "salun-500": ("salun", {}, {"epochs": None, "steps": 500}, "SalUn, 500 iterations (genunlearn before this version)"),
    "esd-u": ("esd", {}, {}, "ESD-u, train-esd.py"),
    "esd-x": ("esd", {}, {"scope": "cross-attention"}, "ESD-x, train-esd.py"),
    "esd-u-esd_sd": ("esd", {}, {"sample_with": "frozen", "timestep_labels": "reached", "scope": "linear-non-cross-attention"},
                     "ESD-u, esd_sd.py's x_t, labels and scope"),
    "finetune": ("finetune", {}, {}, "finetune (retain only)"),
    "uce": ("uce", {}, {}, "UCE, uce_sd_erase.py (last word, towards \"\", nothing preserved)"),
    "uce-preserve": ("uce", {}, {"preserve": "retained"}, "UCE, the retain prompts preserved"),
    "rece": ("rece", {}, {}, "RECE, train.py (UCE, then 3 rounds of adversarial embeddings)"),
    "rece-preserve": ("rece", {}, {"preserve": "retained"}, "RECE, the retain prompts preserved in every round"),
    "uce-2023": ("uce", {}, {"preserve": "retained", "tokens": "last-onward"},
                 "UCE as train_erase.py (2023): last word onward, retain prompts preserved"),
    "advunlearn": ("advunlearn", {}, {"attack_steps": 5},
                   "AdvUnlearn, AdvUnlearn.py (the text encoder), 5 attack steps per iteration (its 30: a CPU's budget)"),
    "advunlearn-lr1e-3": ("advunlearn", {}, {"attack_steps": 5, "lr": 1e-3, "steps": 300, "warmup": 60},
                          "AdvUnlearn (text encoder) at lr 1e-3 for 300 iterations (60 warm-up), 5 attack steps: a CPU's "
                          "budget where lr 1e-5 erases nothing"),
    "uce_adv": ("uce_adv", {}, {}, "UCE with AdvUnlearn's adversarial prompts (genunlearn's combination; 3 rounds)"),
    "esd-u-lora": ("esd", {}, {"lora_rank": 4}, "ESD-u as rank-4 LoRA factors (`--lora-rank 4`)"),
    "esd-u-lora-lr3e-5": ("esd", {}, {"lora_rank": 4, "lr": 3e-5}, "ESD-u as rank-4 LoRA factors at lr 3e-5"),
    "esd-u-lora-lr5e-5": ("esd", {}, {"lora_rank": 4, "lr": 5e-5}, "ESD-u as rank-4 LoRA factors at lr 5e-5"),
    "esd-u-lora-lr1e-4": ("esd", {}, {"lora_rank": 4, "lr": 1e-4},
                          "ESD-u as rank-4 LoRA factors at lr 1e-4 (diffusers' LoRA scripts' rate)"),
}
ATTACKS = ["unlearndiffatk", "ringabell", "relearn"]
# UnlearnDiffAtk at a CPU's budget: 8 images per target prompt, at most 10 timesteps x 20 iterations each (the reference
# runs up to 50 x 40); the other attacks at their defaults
ATTACK_BUDGET = {"unlearndiffatk.images": 8, "unlearndiffatk.timesteps": 10, "unlearndiffatk.iterations": 20}
ATTACK_SAMPLES = 50  # generations per prompt behind every figure of an attacked cell (the ASRs' sample sizes follow)
FIGURES = ("forget_acc", "paraphrase_acc", "remain_acc", "fid_remain", "fid_remain_real", "forget_ink")


def real_captioned_folder(folder: Path, prompts: list[str]) -> Path:
    """An ``imagefolder`` of the embedded digits captioned with ``prompts`` (each prompt's digits in its style)."""
    if (folder / "metadata.jsonl").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for p, prompt in enumerate(prompts):
        for i, image in enumerate(caption_images(prompt)):
            name = f"{p:02d}-{i:04d}.png"
            pixels = ((image[0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()
            Image.fromarray(pixels, mode="L").save(folder / name)
            lines.append(json.dumps({"file_name": name, "text": prompt}))
    atomic_write_text(folder / "metadata.jsonl", "\n".join(lines) + "\n")
    return folder


def cell_figures(report: dict) -> dict:
    """The cell's small record of a finished run: figures before and after, per prompt recognition, the settings."""
    def compact(metrics: dict) -> dict:
        return {**{k: metrics.get(k) for k in FIGURES},
                "per_prompt": {p: v["recognised"] for p, v in metrics.get("per_prompt", {}).items()}}

    environment = report["environment"]
    return {"before": compact(report["before"]), "after": compact(report["after"]), "steps": report["steps"],
            "wall_time_s": report["wall_time_s"], "cost": report.get("cost"), "attacks": report.get("attacks"),
            "eval_samples": report["evaluation"]["per_prompt"], "config": report["config"],
            "device": environment["device_name"] if environment["device_type"] == "cuda" else "cpu",
            "environment": {k: environment[k] for k in ("torch", "threads", "device_type", "mixed_precision", "tf32", "noise")}}


def run_cell(row: str, seed: int, args: argparse.Namespace, accelerator) -> dict:
    method, options, settings, _ = ROWS[row]
    options = dict(options)
    if options.get("data") == "real":
        options["data"] = str(real_captioned_folder(args.output / "real-digits", [CONCEPT, *RETAIN]))
    attacked = {"attacks": ATTACKS, "attack_settings": ATTACK_BUDGET, "eval_samples": ATTACK_SAMPLES} if args.attack else {}
    folder = args.output / ("attacked-runs" if args.attack else "runs") / args.model / row / f"seed-{seed}"
    job = ForgetJob(model=args.model, method=method, output_dir=folder, concepts=[CONCEPT], settings=dict(settings),
                    seed=seed, cache_dir=args.cache_dir, **options, **attacked)
    report = json.loads((job.output_dir / "report.json").read_text()) if (job.output_dir / "report.json").is_file() else None
    if report is not None and (report["model"], report["config"]["seed"]) != (args.model, seed):
        raise UserError(f"{job.output_dir} holds a run of {report['model']}, seed {report['config']['seed']}; move it away")
    if report is not None and args.attack and report["evaluation"]["per_prompt"] != ATTACK_SAMPLES:
        raise UserError(f"{job.output_dir} holds a run at another attack budget; move it away")
    if report is None:
        print(f"running {row} seed {seed}", flush=True)
        report = run_forget_job(job, accelerator)
    return {"row": row, "model": args.model, "concept": CONCEPT, "method": method, "options": ROWS[row][1],
            "settings": settings, "seed": seed, **cell_figures(report)}


def cell_path(cells: Path, model: str, row: str, seed: int, attacked: bool = False) -> Path:
    """A cell's file; an attacked run's (its figures at ``ATTACK_SAMPLES`` per prompt) beside the plain one's."""
    return cells / f"{model}__{row}__s{seed}{'__attacked' if attacked else ''}.json"


def run_grid(args: argparse.Namespace, accelerator) -> list[dict]:
    found, budget = [], {**ATTACK_BUDGET, "eval_samples": ATTACK_SAMPLES} if args.attack else None
    for row in args.rows:
        for seed in args.seeds:
            path = cell_path(args.cells, args.model, row, seed, args.attack)
            if path.is_file():
                cell = json.loads(path.read_text())
                if (cell["options"], cell["settings"], cell.get("attack_budget")) != (ROWS[row][1], ROWS[row][2], budget):
                    raise UserError(f"{path} was measured with another definition of {row}; choose another --cells folder")
            else:
                cell = {**run_cell(row, seed, args, accelerator), **({"attack_budget": budget} if budget else {})}
                if accelerator.is_main_process:
                    atomic_write_text(path, json.dumps(cell, indent=1))
            found.append(cell)
    return found


def summarise(cells: list[dict]) -> list[dict]:
    """Per (row, device): mean ± std over seeds of the after figures, the changes and the ratios to before."""
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell["row"], cell["device"]), []).append(cell)
    rows = []
    for (row, device), runs in groups.items():
        def stats(value) -> dict:
            return mean_std([value(r) for r in runs])

        def worst_change(r: dict) -> float:
            remain = [p for p, v in r["before"]["per_prompt"].items() if v is not None and p in RETAIN]
            return min(r["after"]["per_prompt"][p] - r["before"]["per_prompt"][p] for p in remain)

        rows.append({
            "row": row, "device": device, "seeds": sorted(r["seed"] for r in runs), "steps": runs[0]["steps"],
            "forget_acc": stats(lambda r: r["after"]["forget_acc"]), "forget_max": max(r["after"]["forget_acc"] for r in runs),
            "paraphrase_acc": stats(lambda r: r["after"]["paraphrase_acc"]),
            "remain_change": stats(lambda r: r["after"]["remain_acc"] - r["before"]["remain_acc"]),
            "worst_change": stats(worst_change), "worst_change_min": min(worst_change(r) for r in runs),
            "fid_ratio": stats(lambda r: r["after"]["fid_remain"] / r["before"]["fid_remain"]),
            "fid_real_ratio": stats(lambda r: r["after"]["fid_remain_real"] / r["before"]["fid_remain_real"]),
            "ink_before": stats(lambda r: r["before"]["forget_ink"]), "ink_after": stats(lambda r: r["after"]["forget_ink"]),
            "wall_time_s": stats(lambda r: r["wall_time_s"]),
        })
    order = list(ROWS)
    return sorted(rows, key=lambda r: (order.index(r["row"]) if r["row"] in order else len(order), r["device"]))


def _ms(stats: dict, digits: int = 2) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def render(rows: list[dict]) -> str:
    lines = ["| setting | device | seeds | iterations | forget_acc (max) | paraphrase_acc | remain_acc change | "
             "worst digit's change (min) | fid_remain ratio | fid_remain_real ratio | forget_ink | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = ROWS[r["row"]][3] if r["row"] in ROWS else r["row"]
        lines.append(f"| {label} (`{r['row']}`) | {r['device']} | {len(r['seeds'])} | {r['steps']} | {_ms(r['forget_acc'])} "
                     f"({r['forget_max']:.2f}) | {_ms(r['paraphrase_acc'])} | {_ms(r['remain_change'])} | "
                     f"{_ms(r['worst_change'])} ({r['worst_change_min']:.2f}) | {_ms(r['fid_ratio'], 1)} | "
                     f"{_ms(r['fid_real_ratio'])} | {r['ink_before']['mean']:.3f} → {r['ink_after']['mean']:.3f} | "
                     f"{r['wall_time_s']['mean']:.0f} |")
    return "\n".join(lines)


def finished_cells(cells: Path, model: str, attacked: bool = False) -> list[dict]:
    """The model's finished cells: the plain ones, or with ``attacked`` the attacked ones."""
    return [json.loads(p.read_text()) for p in sorted(cells.glob(f"{model}__*.json")) if p.stem.endswith("__attacked") == attacked]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--model", default="sd-digits")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="the settings to run (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--report-only", action="store_true", help="run nothing: the table of every finished cell")
    parser.add_argument("--attack", action="store_true", help="also attack each erasure (unlearndiffatk, ringabell, relearn "
                        "at ATTACK_BUDGET; figures at ATTACK_SAMPLES per prompt): cells named ...__attacked.json")
    parser.add_argument("--cache-dir", help="pretrained models and generated sets (default: $GENUNLEARN_CACHE)")
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmarks/concept_erasure"),
                        help="the run folders (default: outputs/benchmarks/concept_erasure)")
    parser.add_argument("--cells", type=Path, default=RESULTS / "cells", help="the finished cells (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = make_accelerator()
    try:
        cells = finished_cells(args.cells, args.model, args.attack) if args.report_only else run_grid(args, accelerator)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    if accelerator.is_main_process:
        print(render(summarise(cells)))


if __name__ == "__main__":
    main()
