"""Measured effects of the places where genunlearn's computation differs, or used to differ, from a reference: each
experiment runs one forget job per (row, seed or class), as the command line runs it, and compares the rows.

    python benchmarks/fidelity.py                          # every experiment
    python benchmarks/fidelity.py --experiments fast-ntk-resnet
    python benchmarks/fidelity.py --report-only            # the tables of the finished cells

One small JSON per finished run in benchmarks/results/fidelity/<experiment>/ (committed; a rerun reuses it, and a
cell of another row definition is refused). Run folders go to OUTPUT/, outside git. `python benchmarks/tables.py`
puts the tables into docs/fidelity.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from genunlearn.distributed import make_accelerator
from genunlearn.errors import UserError
from genunlearn.eval.seeds import mean_std
from genunlearn.models.presets import get_preset
from genunlearn.runs.forget import run_forget_job
from genunlearn.runs.job import ForgetJob, finished_report
from genunlearn.storage.files import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results" / "fidelity"
CLASSIFIER = ("forget_acc", "retain_acc", "test_acc", "mia")
PLURAL = {"seed": "seeds", "class": "classes"}
DIFFUSION = ("forget_acc", "remain_acc", "fid_remain")
# experiment: the job, what varies (seed or class), and rows: {name: (method settings, preset train overrides)}
EXPERIMENTS: dict[str, dict] = {
    "sfron-mask-cnn": {
        "title": "SFR-on's mask on cnn-digits (class 3; SGD momentum 0.9, wd 5e-4)", "model": "cnn-digits",
        "method": "sfron", "vary": "seed", "values": [0, 1, 2], "class": 3, "figures": CLASSIFIER, "retrain": False,
        "rows": {"gradient masked (the reference; default)": ({}, {}), "masked weights held": ({"hold_masked": True}, {})},
    },
    "sfron-mask-ddpm": {
        "title": "SFR-on's mask on ddpm-digits (class 3; Adam)", "model": "ddpm-digits", "method": "sfron", "vary": "seed",
        "values": [0, 1, 2], "class": 3, "figures": DIFFUSION, "retrain": False,
        "rows": {"gradient masked (the reference; default)": ({}, {}), "masked weights held": ({"hold_masked": True}, {})},
    },
    "sfron-mask-dit": {
        "title": "SFR-on's mask on dit-digits (class 8, its hardest; Adam)", "model": "dit-digits", "method": "sfron",
        "vary": "seed", "values": [0, 1, 2], "class": 8, "figures": DIFFUSION, "retrain": False,
        "rows": {"gradient masked (the reference; default)": ({}, {}), "masked weights held": ({"hold_masked": True}, {})},
    },
    "fast-ntk-resnet": {
        "title": "Fast-NTK on resnet18-digits-bn (BatchNorm scope)", "model": "resnet18-digits-bn", "method": "fast_ntk",
        "vary": "class", "values": [0, 3, 8], "figures": CLASSIFIER, "retrain": True,
        "rows": {"the reference (ridge at the point, its trapezium error, CE-trained; default)": ({}, {}),
                 "ridge centred on the PEFT start": ({"ridge_centre": "start"}, {}),
                 "scale 1": ({"scale": 1.0}, {}),
                 "trained on ½‖f − (2y−1)‖², ridge at the start (before this version)": ({"ridge_centre": "start"}, {"loss": "mse"})},
    },
    "fast-ntk-vit": {
        "title": "Fast-NTK on vit-digits-prompts (prompts + head)", "model": "vit-digits-prompts", "method": "fast_ntk",
        "vary": "class", "values": [0, 3, 8], "figures": CLASSIFIER, "retrain": True,
        "rows": {"the preset (default)": ({}, {}),
                 "the reference's trapezium scale": ({"scale": "trapezium"}, {}),
                 "scale 1": ({"scale": 1.0}, {}),
                 "ridge centred on the PEFT start": ({"ridge_centre": "start"}, {}),
                 "trained on ½‖f − (2y−1)‖², ridge at the start, scale 1 (before this version)":
                     ({"ridge_centre": "start", "scale": 1.0}, {"loss": "mse"})},
    },
}


def preset_variant(model: str, train: dict, folder: Path) -> str:
    """``model``, or a copy of its preset YAML with ``train`` changed (written to ``folder``)."""
    if not train:
        return model
    raw = get_preset(model).to_dict()
    raw["train"] = {**raw["train"], **train}
    path = folder / f"{model}-{'-'.join(f'{k}-{v}' for k, v in sorted(train.items()))}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def run_cell(name: str, row: str, value: int, args: argparse.Namespace, accelerator) -> dict:
    spec = EXPERIMENTS[name]
    settings, train = spec["rows"][row]
    forgotten = value if spec["vary"] == "class" else spec["class"]
    seed = value if spec["vary"] == "seed" else 0
    slug = str(list(spec["rows"]).index(row))
    job = ForgetJob(model=preset_variant(spec["model"], train, args.output / "presets"), method=spec["method"],
                    output_dir=args.output / name / f"row{slug}-{spec['vary']}{value}", classes=[forgotten],
                    settings=dict(settings), seed=seed, compare_retrain=spec["retrain"], cache_dir=args.cache_dir)
    report = finished_report(job)
    if report is None:
        print(f"running {name}: {row}, {spec['vary']} {value}", flush=True)
        report = run_forget_job(job, accelerator)
    figures = {phase: {k: report[phase].get(k) for k in spec["figures"]} for phase in ("before", "after")}
    if spec["retrain"]:
        figures["oracle"] = {k: report["oracle"].get(k) for k in spec["figures"]}
    environment = report["environment"]
    return {"experiment": name, "row": row, "settings": settings, "train": train, spec["vary"]: value, **figures,
            "method_info": {k: v for k, v in report["method_info"].items() if isinstance(v, (int, float, str))},
            "wall_time_s": report["wall_time_s"],
            "environment": {k: environment[k] for k in ("torch", "threads", "device_type", "mixed_precision", "tf32", "noise")}}


def cell_path(name: str, row: str, value: int) -> Path:
    spec = EXPERIMENTS[name]
    return RESULTS / name / f"row{list(spec['rows']).index(row)}__{spec['vary']}{value}.json"


def run_experiment(name: str, args: argparse.Namespace, accelerator) -> None:
    spec = EXPERIMENTS[name]
    for row in spec["rows"]:
        for value in spec["values"]:
            path = cell_path(name, row, value)
            if path.is_file():
                cell = json.loads(path.read_text())
                if (cell["row"], cell["settings"], cell["train"]) != (row, *spec["rows"][row]):
                    raise UserError(f"{path} holds another row definition; remove it to measure this one")
                continue
            cell = run_cell(name, row, value, args, accelerator)
            if accelerator.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(cell, indent=1))


def finished_cells(name: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((RESULTS / name).glob("*.json"))]


def render(name: str, cells: list[dict]) -> str:
    """Mean ± std over the experiment's seeds or classes of each row's figures before → after (FID: the ratio)."""
    spec = EXPERIMENTS[name]
    figures = list(spec["figures"])
    heads = [("FID ratio" if f.startswith("fid") else f) for f in figures]
    lines = [f"{spec['title']}; mean ± std over {PLURAL[spec['vary']]} {', '.join(map(str, spec['values']))}",
             "", "| setting | runs | " + " | ".join(heads) + (" | oracle forget / retain" if spec["retrain"] else "") + " |",
             "|---|---|" + "---|" * len(figures) + ("---|" if spec["retrain"] else "")]
    for row in spec["rows"]:
        runs = [c for c in cells if c["row"] == row]
        if not runs:
            continue
        parts = []
        for figure in figures:
            if figure.startswith("fid"):
                stats = mean_std([r["after"][figure] / r["before"][figure] for r in runs])
                parts.append(f"×{stats['mean']:.2f} ± {stats['std']:.2f}")
            else:
                before, after = mean_std([r["before"][figure] for r in runs]), mean_std([r["after"][figure] for r in runs])
                parts.append(f"{before['mean']:.3f} → {after['mean']:.3f} ± {after['std']:.3f}")
        oracle = ""
        if spec["retrain"]:
            forget, retain = (mean_std([r["oracle"][k] for r in runs]) for k in ("forget_acc", "retain_acc"))
            oracle = f" | {forget['mean']:.3f} / {retain['mean']:.3f}"
        lines.append(f"| {row} | {len(runs)} | " + " | ".join(parts) + oracle + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--experiments", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    parser.add_argument("--report-only", action="store_true", help="run nothing: the tables of the finished cells")
    parser.add_argument("--cache-dir", help="pretrained models (default: $GENUNLEARN_CACHE)")
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmarks/fidelity"), help="the run folders")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = make_accelerator()
    for name in args.experiments:
        if not args.report_only:
            try:
                run_experiment(name, args, accelerator)
            except UserError as exc:
                raise SystemExit(f"error: {exc}") from None
        if accelerator.is_main_process:
            print(render(name, finished_cells(name)), end="\n\n")


if __name__ == "__main__":
    main()
