"""Diffusion forgetting quality over a grid: presets x forgotten classes x seeds x data (real, data-free) x methods,
and the retrain oracle once per (preset, class).

Each run keeps a checkpoint every --every steps. Every checkpoint is screened with --screen-samples samples of the
forgotten class; where the screen reads <= 0.15, the judgement uses --forget-samples samples, until forget_acc
<= 0.01 has been seen (and always at the end). The remaining classes (FID, per-class accuracy) are
sampled at the first steps with forget_acc <= 0.05 and <= 0.01, every --fid-every steps, and at the end. FID
ratios are against the original model under the same protocol and seed; data-free runs measure FID against the
original model's own samples. Standard errors: binomial for accuracies, a bootstrap over the samples for FID.

    python benchmarks/forget_quality.py --quick                       # ~15 min on 2 cores
    python benchmarks/forget_quality.py                               # the full grid (hours on CPU; resumable)
    accelerate launch --multi_gpu --num_processes 2 benchmarks/forget_quality.py --methods sfron --no-oracle

Writes CELLS/*.json (one small file per finished run, default benchmarks/results/forget_quality/cells, committed so that
the grid accumulates across sessions and machines; a rerun reuses them), and OUTPUT/forget_quality.json (all cells
and the summary), OUTPUT/forget_quality.md and OUTPUT/forget_quality-<preset>.png (curves with seed bands). The docs'
tables come from the committed cells: ``python benchmarks/tables.py``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file

from genunlearn.cli import parse_setting
from genunlearn.kinds.diffusion_setup import DiffusionSetup, prepare_diffusion
from genunlearn.distributed import make_accelerator
from genunlearn.engine.checkpoint import checkpoint_folders, checkpoint_step
from genunlearn.errors import UserError
from genunlearn.eval.generator_eval import generator_metrics, forget_sample_accuracy
from genunlearn.eval.plots import plt, save_figure
from genunlearn.eval.seeds import mean_std
from genunlearn.runs.job import ForgetJob
from genunlearn.methods.registry import method_config
from genunlearn.models.sampling import pipeline_for
from genunlearn.models.presets import get_preset
from genunlearn.precision import numerics
from genunlearn.storage.files import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
SCREEN_BOUND = 0.15  # a 100-sample screen above this leaves P(forget_acc <= 0.05) below 1e-4
THRESHOLDS = {"hit_05": 0.05, "hit_01": 0.01}
FID_DRAWS = 50
QUICK = {"presets": ["ddpm-digits"], "classes": [3], "seeds": [0], "methods": ["sfron", "random_label"],
         "remain_samples": 50, "oracle": False}


@dataclass(frozen=True)
class Cell:
    """One unlearning run of the grid (``method`` "original": the model before unlearning; "retrain": the oracle)."""

    preset: str
    data: str
    method: str
    forget_class: int
    seed: int
    processes: int = 1

    def name(self) -> str:
        if self.method == "original":
            return f"{self.preset}__{self.data}__original__c{self.forget_class}__s{self.seed}"
        return f"{self.preset}__{self.data}__{self.method}__c{self.forget_class}__s{self.seed}__p{self.processes}"


def binomial(acc: float, n: int) -> dict:
    return {"forget_acc": acc, "forget_n": n, "forget_se": math.sqrt(acc * (1 - acc) / n)}


class Evaluator:
    """The grid's evaluations of one setup (preset, data, class, seed): forget-class judgements and remain scores."""

    def __init__(self, setup: DiffusionSetup, args: argparse.Namespace, accelerator) -> None:
        self.setup, self.args, self.accelerator = setup, args, accelerator

    def forget(self, model: torch.nn.Module, n: int) -> dict:
        protocol = dataclasses.replace(self.setup.protocol, per_class=n)
        pipeline = pipeline_for(self.setup.task, model)
        return binomial(forget_sample_accuracy(pipeline, self.setup.classifier, self.setup.forgotten, protocol, self.accelerator), n)

    def remain(self, model: torch.nn.Module) -> dict:
        setup = self.setup
        protocol = dataclasses.replace(setup.protocol, per_class=self.args.remain_samples)
        metrics, _ = generator_metrics(pipeline_for(setup.task, model), setup.classifier, [], setup.remaining, setup.features,
                                        setup.fid, protocol, self.accelerator, heldout=setup.heldout, fid_draws=FID_DRAWS)
        keys = ("remain_acc", "fid_remain", "fid_remain_std", "heldout_acc", "fid_heldout", "per_class_acc")
        return {k: metrics[k] for k in keys}

    def original(self) -> dict:
        return {**self.forget(self.setup.task.model, self.args.forget_samples), **self.remain(self.setup.task.model)}


def relative(remain: dict, original: dict) -> dict:
    """Figures of a remain evaluation relative to the original: FID ratio (with its standard error) and the largest
    per-class accuracy drop over the remaining classes."""
    ratio = remain["fid_remain"] / original["fid_remain"]
    spread = math.hypot(remain["fid_remain_std"] / max(remain["fid_remain"], 1e-12),
                        original["fid_remain_std"] / max(original["fid_remain"], 1e-12))
    drops = {c: original["per_class_acc"][c] - acc for c, acc in remain["per_class_acc"].items() if c in original["per_class_acc"]}
    worst = max(drops, key=drops.get)
    return {"fid_ratio": ratio, "fid_ratio_se": ratio * spread, "worst_class": int(worst), "worst_class_drop": drops[worst]}


def checkpoints(folder: Path, template: torch.nn.Module):
    """``(step, model)`` for every checkpoint in ``folder``, oldest first, loaded one at a time."""
    for path in checkpoint_folders(folder):
        model = copy.deepcopy(template)
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        yield checkpoint_step(path), model


def run_config(cell: Cell, overrides: dict, every: int):
    """The method and its resolved settings for a run cell (the preset's defaults under the grid's overrides)."""
    return method_config(cell.method, get_preset(cell.preset),
                         {"seed": cell.seed, **overrides, "checkpoint_every": every, "keep_checkpoints": 10**6})


def run_settings(cell: Cell, args: argparse.Namespace) -> dict | None:
    """A run cell's resolved method settings as its JSON holds them (None for the original and the oracle)."""
    if cell.method in ("original", "retrain"):
        return None
    return json.loads(json.dumps(dataclasses.asdict(run_config(cell, args.overrides, args.every)[1])))


def run_method(cell: Cell, evaluator: Evaluator, original: dict, overrides: dict, work: Path, accelerator) -> dict:
    """Unlearn with checkpoints, judge every checkpoint (screen, then full near the thresholds), score the remaining
    classes at the threshold crossings, every --fid-every steps and at the end."""
    args, setup = evaluator.args, evaluator.setup
    spec, cfg = run_config(cell, overrides, args.every)
    setup.task.cache_dir = None  # Fishers and saliency recomputed per run: the wall time includes the mask
    if accelerator.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    result = spec.run(setup.task, setup.split, cfg, accelerator, checkpoint_dir=work, resume=False)
    accelerator.wait_for_everyone()
    points = [*checkpoints(work, setup.task.model), (result.steps, result.model)]
    curve, hits, remain = [], {k: None for k in THRESHOLDS}, {}
    for step, model in points:
        final = step == result.steps
        figures = evaluator.forget(model, args.screen_samples)
        if figures["forget_acc"] <= SCREEN_BOUND and (hits["hit_01"] is None or final):
            figures = evaluator.forget(model, args.forget_samples)
        if figures["forget_n"] >= args.forget_samples:
            for key, bound in THRESHOLDS.items():
                if hits[key] is None and figures["forget_acc"] <= bound:
                    hits[key] = step
        curve.append({"step": step, **figures})
        if final or step in hits.values() or (args.fid_every and step % args.fid_every == 0):
            scores = evaluator.remain(model)
            remain[step] = {"step": step, **scores, **relative(scores, original)}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "settings": dataclasses.asdict(cfg), "steps": result.steps, "mask_time_s": result.info.get("mask_time_s"),
        "wall_time_s": result.wall_time_s + result.info.get("mask_time_s", 0.0), "curve": curve, "remain": list(remain.values()), **hits,
        "at_hit_05": remain.get(hits["hit_05"]), "at_hit_01": remain.get(hits["hit_01"]),
        "final": {**curve[-1], **remain[result.steps]},
    }


def run_oracle(cell: Cell, evaluator: Evaluator, original: dict, accelerator) -> dict:
    """The retrain oracle (the preset's pretraining recipe on D_r from scratch), timed and scored like a run's end."""
    spec, cfg = method_config("retrain", get_preset(cell.preset), {"seed": cell.seed})
    started = time.perf_counter()
    result = spec.run(evaluator.setup.task, evaluator.setup.split, cfg, accelerator, checkpoint_dir=None, resume=False)
    wall = time.perf_counter() - started
    scores = evaluator.remain(result.model)
    final = {**evaluator.forget(result.model, evaluator.args.forget_samples), **scores, **relative(scores, original)}
    return {"steps": result.steps, "wall_time_s": wall, "curve": [], "remain": [], "final": final}


def device_name(accelerator) -> str:
    """What a run's wall time was measured on: the GPU's name, or "cpu"."""
    device = accelerator.device
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def grid_settings(args: argparse.Namespace) -> dict:
    """The settings every cell's figures depend on; a cell is reused only under the same ones."""
    keys = ("every", "fid_every", "forget_samples", "screen_samples", "remain_samples", "data_free_samples", "overrides",
            "pretrained", "eval_steps")
    return {k: getattr(args, k) for k in keys}


def cached(path: Path, compute, settings: dict, accelerator, method_settings: dict | None = None) -> dict:
    """The JSON in ``path`` if it exists (a finished cell), else ``compute()`` written there atomically by the main
    process; a finished cell of other grid ``settings`` or other ``method_settings`` (a changed preset) is refused."""
    found = [json.loads(path.read_text()) if path.is_file() else None]
    broadcast_object_list(found)
    if found[0] is not None:
        if found[0]["grid_settings"] != settings:
            raise UserError(f"{path} was measured with other settings ({found[0]['grid_settings']}); choose another --cells folder")
        if method_settings is not None and found[0].get("settings") != method_settings:
            changed = sorted(k for k in method_settings if found[0].get("settings", {}).get(k) != method_settings[k])
            raise UserError(f"{path} was measured with other method settings ({', '.join(changed)} changed); choose another --cells folder")
        return found[0]
    value = {**compute(), "grid_settings": settings}
    if accelerator.is_main_process:
        atomic_write_text(path, json.dumps(value, indent=2))
    return value


def run_grid(args: argparse.Namespace, accelerator) -> list[dict]:
    cells_dir = args.cells
    processes = accelerator.num_processes
    settings = grid_settings(args)
    results = []
    for preset in args.presets:
        for data in args.data:
            for forget_class in args.classes:
                for seed in args.seeds:
                    job = ForgetJob(model=preset, method="none", output_dir=args.output, classes=[forget_class], seed=seed,
                                    data_free=data == "data-free", data_free_samples=args.data_free_samples, pretrained=args.pretrained,
                                    eval_samples=args.remain_samples, eval_steps=args.eval_steps, cache_dir=args.cache_dir)
                    todo = [Cell(preset, data, m, forget_class, seed, processes) for m in args.methods]
                    if args.oracle and data == "real" and seed == args.seeds[0]:
                        todo.append(Cell(preset, data, "retrain", forget_class, seed, processes))
                    if all((cells_dir / f"{c.name()}.json").is_file() for c in todo):
                        results += [cached(cells_dir / f"{c.name()}.json", None, settings, accelerator, run_settings(c, args)) for c in todo]
                        continue
                    evaluator = Evaluator(prepare_diffusion(job, get_preset(preset), accelerator), args, accelerator)
                    base = Cell(preset, data, "original", forget_class, seed)
                    original = cached(cells_dir / f"{base.name()}.json", lambda: {**dataclasses.asdict(base), **evaluator.original()},
                                      settings, accelerator)
                    for cell in todo:
                        def compute(cell=cell) -> dict:
                            print(f"running {cell.name()}", flush=True)
                            entry = (run_oracle(cell, evaluator, original, accelerator) if cell.method == "retrain"
                                     else run_method(cell, evaluator, original, args.overrides, args.output / "work" / cell.name(), accelerator))
                            return {**dataclasses.asdict(cell), "device": device_name(accelerator),
                                    "environment": cell_environment(accelerator), "original": original, **entry}
                        results.append(cached(cells_dir / f"{cell.name()}.json", compute, settings, accelerator, run_settings(cell, args)))
    return results


def cell_environment(accelerator) -> dict:
    """What a cell was measured with: torch, threads and the numerics (device type, precision, TF32, draws)."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), **numerics(accelerator)}


def finished_cells(cells_dir: Path) -> list[dict]:
    """Every finished run and oracle in ``cells_dir`` (the originals are inside them)."""
    cells = [json.loads(path.read_text()) for path in sorted(cells_dir.glob("*.json"))]
    found = [cell for cell in cells if cell["method"] != "original"]
    if not found:
        raise UserError(f"{cells_dir} holds no finished run; run the grid first")
    return found


def within(value: float, bound: float) -> bool:
    """``value <= bound`` up to float rounding (accuracy differences of count fractions miss 0.05 by 1e-17)."""
    return value <= bound + 1e-9


def summarise(results: list[dict]) -> list[dict]:
    """Per (preset, method, data, processes, device): mean ± std and worst over classes x seeds of the headline
    figures; wall times are compared with the oracle's on the same device."""
    oracle_time = {(r["preset"], r["forget_class"], r.get("device", "cpu")): r["wall_time_s"] for r in results if r["method"] == "retrain"}
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["preset"], r["method"], r["data"], r["processes"], r.get("device", "cpu")), []).append(r)
    rows = []
    for (preset, method, data, processes, device), runs in groups.items():
        final = [r["final"] for r in runs]
        row = {"preset": preset, "method": method, "data": data, "processes": processes, "device": device, "runs": len(runs),
               "steps": max(r["steps"] for r in runs),
               "forget_acc": mean_std([f["forget_acc"] for f in final]), "forget_worst": max(f["forget_acc"] for f in final),
               "forget_n": min(f["forget_n"] for f in final),
               "fid_ratio": mean_std([f["fid_ratio"] for f in final]), "fid_ratio_worst": max(f["fid_ratio"] for f in final),
               "fid_ratio_se": sum(f["fid_ratio_se"] for f in final) / len(final),
               "remain_acc": mean_std([f["remain_acc"] for f in final]),
               "worst_class_drop": mean_std([f["worst_class_drop"] for f in final]),
               "worst_class_drop_worst": max(f["worst_class_drop"] for f in final),
               "wall_time_s": mean_std([r["wall_time_s"] for r in runs])}
        times = [r["wall_time_s"] / oracle_time[(preset, r["forget_class"], device)] for r in runs
                 if (preset, r["forget_class"], device) in oracle_time]
        row["wall_vs_oracle"] = mean_std(times) if times and method != "retrain" else None
        for key in THRESHOLDS:
            reached = [r for r in runs if r.get(key) is not None]
            row[key] = {"reached": len(reached), **(mean_std([r[key] for r in reached]) if reached else {})}
            ratios = [r[f"at_{key}"]["fid_ratio"] for r in reached]
            row[f"fid_ratio_at_{key}"] = mean_std(ratios) if ratios else None
        heldout = [f["heldout_acc"] for f in final if f.get("heldout_acc") is not None]
        row["heldout_acc"] = mean_std(heldout) if heldout else None
        rows.append(row)
    return sorted(rows, key=lambda r: (r["preset"], r["data"], r["method"], r["processes"], r["device"]))


def _ms(stats: dict | None, digits: int = 3) -> str:
    return "n/a" if not stats or "mean" not in stats else f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _hit(stats: dict, runs: int, method: str) -> str:
    if method == "retrain":
        return "n/a"  # the oracle is judged once, at its end
    return f"never (0/{runs})" if not stats["reached"] else f"{stats['mean']:.0f} ± {stats['std']:.0f} ({stats['reached']}/{runs})"


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets for SFR-on, each with the figures that decide it."""
    lines = []
    for row in rows:
        if row["method"] != "sfron" or row["processes"] != 1:
            continue
        checks = [
            ("forget_acc mean <= 0.02", within(row["forget_acc"]["mean"], 0.02), f"{row['forget_acc']['mean']:.3f}"),
            ("forget_acc worst <= 0.05", within(row["forget_worst"], 0.05), f"{row['forget_worst']:.3f}"),
            ("FID ratio mean <= 1.15", within(row["fid_ratio"]["mean"], 1.15), f"{row['fid_ratio']['mean']:.2f}"),
            ("FID ratio worst <= 1.25", within(row["fid_ratio_worst"], 1.25), f"{row['fid_ratio_worst']:.2f}"),
            ("worst remain-class drop <= 0.05", within(row["worst_class_drop_worst"], 0.05), f"{row['worst_class_drop_worst']:.3f}"),
            ("<= 50 iterations", row["steps"] <= 50, str(row["steps"])),
        ]
        if row["wall_vs_oracle"]:
            checks.append(("wall time <= 5% of retrain", within(row["wall_vs_oracle"]["mean"], 0.05), f"{100 * row['wall_vs_oracle']['mean']:.1f}%"))
        verdicts = ", ".join(f"{name}: {'met' if ok else 'NOT met'} ({value})" for name, ok, value in checks)
        lines.append(f"- {row['preset']}, {row['data']} ({row['device']}): {verdicts}")

    def runs_of(preset: str, method: str, data: str) -> list[dict]:  # 1-process rows, on any device
        return [r for r in rows if (r["preset"], r["method"], r["data"], r["processes"]) == (preset, method, data, 1)]

    for row in (r for r in rows if r["method"] == "sfron" and r["processes"] == 1):
        for rival in (r for other in ("salun", "random_label") for r in runs_of(row["preset"], other, row["data"])):
            mine, theirs = row["hit_05"], rival["hit_05"]
            fewer = bool(mine["reached"]) and (not theirs["reached"] or mine["mean"] < theirs["mean"])
            ratios = [row["fid_ratio_at_hit_05"], rival["fid_ratio_at_hit_05"]]
            lower = ratios[0] is not None and (ratios[1] is None or ratios[0]["mean"] <= ratios[1]["mean"])
            lines.append(f"- {row['preset']}, {row['data']}: SFR-on reaches forget_acc <= 0.05 at step {_hit(mine, row['runs'], 'sfron')} "
                         f"with FID ratio {_ms(ratios[0], 2)}; {rival['method']} at {_hit(theirs, rival['runs'], rival['method'])} with "
                         f"{_ms(ratios[1], 2)}: SFR-on {'does' if fewer else 'does NOT'} forget in fewer iterations, at "
                         f"{'an equal or lower' if lower else 'a higher'} FID ratio there")
    for row in (r for r in rows if r["processes"] != 1):
        for single in runs_of(row["preset"], row["method"], row["data"]):
            close = [abs(row[k]["mean"] - single[k]["mean"]) <= single[k]["std"] for k in ("forget_acc", "fid_ratio")]
            lines.append(f"- {row['preset']}, {row['method']}, {row['data']}, {row['processes']} processes vs 1: forget_acc "
                         f"{_ms(row['forget_acc'])} vs {_ms(single['forget_acc'])}, FID ratio {_ms(row['fid_ratio'], 2)} vs "
                         f"{_ms(single['fid_ratio'], 2)}: {'within' if all(close) else 'NOT within'} one 1-process std")
    return lines


def render(rows: list[dict], args: argparse.Namespace) -> str:
    lines = ["# Diffusion forgetting quality", "",
             f"Forget accuracy from up to {args.forget_samples} samples of the forgotten class per judgement (screened with "
             f"{args.screen_samples}); remain figures from {args.remain_samples} samples per remaining class (FID pooled over "
             f"them; its standard error from {FID_DRAWS} bootstrap resamplings). Mean ± sample std over classes x seeds; worst = "
             "the highest forget_acc / FID ratio / class drop of any run; wall time includes the mask (Fishers, saliency). Hits: the first evaluated step (every "
             f"{args.every}) with forget_acc <= 0.05 / 0.01, mean ± std over the runs that reach it (reached/runs).", ""]
    for preset in dict.fromkeys(r["preset"] for r in rows):
        lines += [f"## {preset}", "", preset_table(rows, preset), ""]
    lines += ["## Targets (SFR-on)", "", *targets(rows), ""]
    return "\n".join(lines)


def process_table(one: list[dict], two: list[dict]) -> str:
    """Runs of the same (preset, method, data, class, seed) with 1 and with N processes side by side: the final
    forget accuracy and FID ratio of each, their means ± std, and whether the N-process means lie within one
    1-process std."""
    key = lambda r: (r["preset"], r["method"], r["data"], r["forget_class"], r["seed"])  # noqa: E731
    paired = {key(r): r for r in one if r["processes"] == 1}
    pairs = [(paired[key(r)], r) for r in sorted(two, key=key) if r["processes"] > 1 and key(r) in paired]
    if not pairs:
        return "*No paired runs yet.*"
    lines = ["| preset | method | class | seed | forget_acc, 1 process | N processes | FID ratio, 1 process | N processes |",
             "|---|---|---|---|---|---|---|---|"]
    for a, b in pairs:
        lines.append(f"| {a['preset']} | {a['method']} | {a['forget_class']} | {a['seed']} | {a['final']['forget_acc']:.3f} | "
                     f"{b['final']['forget_acc']:.3f} ({b['processes']}) | {a['final']['fid_ratio']:.3f} | {b['final']['fid_ratio']:.3f} |")
    verdicts = []
    for figure in ("forget_acc", "fid_ratio"):
        first, second = (mean_std([r["final"][figure] for r in side]) for side in zip(*pairs))
        close = abs(first["mean"] - second["mean"]) <= first["std"]
        verdicts.append(f"{figure} {_ms(first)} (1 process) vs {_ms(second)}: {'within' if close else 'NOT within'} one "
                        "1-process std")
    return "\n".join(lines) + "\n\n" + "; ".join(verdicts) + f" ({len(pairs)} pairs)."


def preset_table(rows: list[dict], preset: str) -> str:
    """The summary rows of one preset as a markdown table."""
    lines = ["| method | data | procs | device | runs | steps | forget_acc (worst) | FID ratio [mean SE] (worst) | "
             "remain_acc | worst class drop (worst) | step to <= 0.05 | FID ratio there | step to <= 0.01 | wall s | x retrain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["preset"] == preset):
        ratio = "" if not r["wall_vs_oracle"] else f"{r['wall_vs_oracle']['mean']:.3f}"
        lines.append(
            f"| {r['method']} | {r['data']} | {r['processes']} | {r['device']} | {r['runs']} | {r['steps']} | {_ms(r['forget_acc'])} ({r['forget_worst']:.3f}) | "
            f"{_ms(r['fid_ratio'], 2)} [SE {r['fid_ratio_se']:.2f}] ({r['fid_ratio_worst']:.2f}) | {_ms(r['remain_acc'])} | "
            f"{_ms(r['worst_class_drop'])} ({r['worst_class_drop_worst']:.3f}) | {_hit(r['hit_05'], r['runs'], r['method'])} | "
            f"{_ms(r['fid_ratio_at_hit_05'], 2)} | {_hit(r['hit_01'], r['runs'], r['method'])} | {r['wall_time_s']['mean']:.1f} | {ratio} |")
    return "\n".join(lines)


def plot(results: list[dict], preset: str, path: Path) -> None:
    """Forget accuracy and FID ratio against the step, one line per method (mean over classes x seeds) with a band
    from the lowest to the highest run; the retrain oracle dashed."""
    datas = [d for d in ("real", "data-free") if any(r["preset"] == preset and r["data"] == d for r in results)]
    figure, axes = plt.subplots(len(datas), 2, figsize=(11, 3.6 * len(datas)), squeeze=False)
    for row, data in zip(axes, datas):
        runs = [r for r in results if r["preset"] == preset and r["data"] == data and r["method"] != "retrain"]
        for method in dict.fromkeys(r["method"] for r in runs):
            mine = [r for r in runs if r["method"] == method]
            for axis, series in ((row[0], lambda r: [(p["step"], p["forget_acc"]) for p in r["curve"]]),
                                 (row[1], lambda r: [(p["step"], p["fid_ratio"]) for p in r["remain"]])):
                per_step: dict[int, list[float]] = {}
                for r in mine:
                    for step, value in [(0, 1.0 if axis is row[1] else r["original"]["forget_acc"]), *series(r)]:
                        per_step.setdefault(step, []).append(value)
                steps = sorted(s for s, v in per_step.items() if len(v) == len(mine))
                mean = [sum(per_step[s]) / len(per_step[s]) for s in steps]
                line, = axis.plot(steps, mean, marker=".", label=f"{method} ({len(mine)} runs)")
                axis.fill_between(steps, [min(per_step[s]) for s in steps], [max(per_step[s]) for s in steps],
                                  color=line.get_color(), alpha=0.2)
        for axis, key in ((row[0], "forget_acc"), (row[1], "fid_ratio")):
            oracle = [r["final"][key] for r in results if r["preset"] == preset and r["method"] == "retrain"]
            if oracle and data == "real":
                axis.axhline(sum(oracle) / len(oracle), color="grey", linestyle="--", label="retrain oracle")
        row[0].axhline(0.05, color="black", linewidth=0.5, linestyle=":")
        row[0].set_ylim(-0.02, 1.02)
        row[1].axhline(1.0, color="black", linewidth=0.5, linestyle=":")
        row[0].set(xlabel="unlearning step", ylabel="forget accuracy", title=f"{data}: forgotten class still drawn")
        row[1].set(xlabel="unlearning step", ylabel="FID ratio (remaining / original)", title=f"{data}: damage to the others")
        row[1].legend(fontsize=7)
    figure.suptitle(f"{preset}: mean over classes x seeds, band = lowest..highest run")
    save_figure(figure, path, dpi=80)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--presets", nargs="+", default=["ddpm-digits", "dit-digits"])
    parser.add_argument("--classes", type=int, nargs="+", default=[0, 3, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", nargs="+", choices=["real", "data-free"], default=["real", "data-free"])
    parser.add_argument("--methods", nargs="*", default=["sfron", "salun", "random_label", "finetune"])
    parser.add_argument("--set", dest="settings", type=parse_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="a method setting for every method of the grid (repeatable); its cells go to another --cells folder")
    parser.add_argument("--every", type=int, default=10, help="checkpoint and judge every N steps (default 10)")
    parser.add_argument("--fid-every", type=int, default=50, help="also score the remaining classes every N steps (0: only at "
                        "the threshold crossings and the end; default 50)")
    parser.add_argument("--forget-samples", type=int, default=500, help="samples of the forgotten class per judgement (default 500)")
    parser.add_argument("--screen-samples", type=int, default=100, help="samples of the screening judgement (default 100)")
    parser.add_argument("--remain-samples", type=int, default=100, help="samples per remaining class for FID (default 100)")
    parser.add_argument("--data-free-samples", type=int, default=100, help="generated training samples per class (default 100)")
    parser.add_argument("--no-oracle", dest="oracle", action="store_false", help="skip the retrain oracle (minutes per class)")
    parser.add_argument("--quick", action="store_true", help="ddpm-digits, class 3, seed 0, sfron and random_label, real and "
                        "data-free, 50 samples per remaining class, no oracle (~15 min on 2 cores)")
    parser.add_argument("--pretrained", help="a pipeline folder to start from instead of the preset's weights (one preset)")
    parser.add_argument("--eval-steps", type=int, help="sampling steps of every evaluation (default: the preset's)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: summarise every finished cell in OUTPUT/cells (a partial or mixed grid)")
    parser.add_argument("--cache-dir", help="pretrained models and generated sets (default: $GENUNLEARN_CACHE)")
    parser.add_argument("--output", type=Path, help="summaries and run checkpoints (default: outputs/benchmarks/forget_quality; "
                        "--quick: forget_quality-quick)")
    parser.add_argument("--cells", type=Path, help="the finished cells (default: benchmarks/results/forget_quality/cells, "
                        "committed; --quick: OUTPUT/cells)")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    args.output = args.output or Path("outputs/benchmarks") / ("forget_quality-quick" if args.quick else "forget_quality")
    args.cells = args.cells or (args.output / "cells" if args.quick else RESULTS / "forget_quality" / "cells")
    if args.every < 1 or args.fid_every % args.every or args.screen_samples > args.forget_samples:
        parser.error("--every must be >= 1, --fid-every a multiple of it, --screen-samples <= --forget-samples")
    args.overrides = dict(args.settings)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = make_accelerator()
    try:
        results = finished_cells(args.cells) if args.report_only else run_grid(args, accelerator)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    vars(args).update(results[0]["grid_settings"])  # --report-only: the settings the cells were measured with
    if not accelerator.is_main_process:
        return
    if (args.output / "work").is_dir() and not any((args.output / "work").iterdir()):
        (args.output / "work").rmdir()  # each run removes its own checkpoints; another grid may still be running
    rows = summarise(results)
    stem = args.output / "forget_quality"
    paths = {k: str(getattr(args, k)) for k in ("output", "cells")}
    atomic_write_text(stem.with_suffix(".json"), json.dumps({"settings": {k: v for k, v in vars(args).items() if k not in paths} |
                                                             paths, "summary": rows, "cells": results}, indent=2))
    atomic_write_text(stem.with_suffix(".md"), render(rows, args))
    for preset in dict.fromkeys(r["preset"] for r in results):
        plot(results, preset, args.output / f"forget_quality-{preset}.png")
    print(render(rows, args))
    print(f"wrote {stem}.json, {stem}.md and the curves beside them")


if __name__ == "__main__":
    main()
