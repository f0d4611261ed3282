"""Forgetting curves on a diffusion preset: forget accuracy and remain FID every N steps for several methods, plus
each method's unlearning wall time next to `retrain`'s (training from scratch on the retain set).

Each method runs once with a checkpoint every N steps (all kept); every checkpoint is then sampled under one
evaluation protocol. Wall times come from a second run of each method without checkpoints.

    python benchmarks/forget_curve.py --model ddpm-digits --class 3 --every 10
Writes outputs/benchmarks/forget_curve-<model>.json and .png.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from genunlearn import SplitSpec, load_task, make_forget_split
from genunlearn.distributed import make_accelerator
from genunlearn.engine.checkpoint import checkpoint_folders, checkpoint_step
from genunlearn.eval.generator_eval import (
    SamplingProtocol,
    generator_metrics,
    fid_setup,
    reference_features,
    reference_images,
)
from genunlearn.eval.plots import plt, save_figure
from genunlearn.methods.registry import method_config
from genunlearn.models.sampling import pipeline_for
from genunlearn.storage.files import atomic_write_text


def curve(task, split, method: str, every: int, evaluate, accelerator, steps: int | None) -> dict:
    """Forget accuracy and remain FID at step 0, every ``every`` steps and at the end; and the clean wall time."""
    settings = {} if steps is None else {"steps": steps}
    spec, cfg = method_config(method, task.preset, {**settings, "checkpoint_every": every, "keep_checkpoints": 10**6})
    with tempfile.TemporaryDirectory() as folder:
        result = spec.run(task, split, cfg, accelerator, checkpoint_dir=Path(folder), resume=False)
        points = [(0, task.model)]
        for checkpoint in checkpoint_folders(Path(folder)):
            model = copy.deepcopy(task.model)
            model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
            points.append((checkpoint_step(checkpoint), model))
    points.append((result.steps, result.model))
    figures = []
    for step, model in points:
        metrics = evaluate(model)
        figures.append({"step": step, "forget_acc": metrics["forget_acc"], "fid_remain": metrics["fid_remain"],
                        "remain_acc": metrics["remain_acc"]})
        print(f"{method:>13s} step {step:4d}: forget_acc {metrics['forget_acc']:.3f}  fid_remain {metrics['fid_remain']:.3f}", flush=True)
    _, timing_cfg = method_config(method, task.preset, settings)
    wall = spec.run(task, split, timing_cfg, accelerator, checkpoint_dir=None, resume=False).wall_time_s
    return {"steps": result.steps, "wall_time_s": wall, "curve": figures}


def plot(results: dict, path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, entry in results["methods"].items():
        steps = [p["step"] for p in entry["curve"]]
        axes[0].plot(steps, [p["forget_acc"] for p in entry["curve"]], marker="o", label=method)
        axes[1].plot(steps, [p["fid_remain"] for p in entry["curve"]], marker="o", label=method)
    if "retrain" in results:
        for axis, key in ((axes[0], "forget_acc"), (axes[1], "fid_remain")):
            axis.axhline(results["retrain"][key], color="grey", linestyle="--", label="retrain (oracle)")
    axes[1].axhline(results["original"]["fid_remain"], color="black", linestyle=":", label="original model")
    axes[0].set(xlabel="unlearning step", ylabel="forget accuracy", title="forgotten class still drawn")
    axes[1].set(xlabel="unlearning step", ylabel="FID (remaining classes, log scale)", title="damage to the other classes",
                yscale="log")
    axes[1].legend()
    figure.suptitle(f"{results['model']}, class {results['class']}")
    save_figure(figure, path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ddpm-digits")
    parser.add_argument("--class", dest="forget_class", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["sfron", "salun", "random_label"])
    parser.add_argument("--every", type=int, default=10, help="evaluate every N unlearning steps")
    parser.add_argument("--steps", type=int, help="unlearning steps for every method (default: each preset setting)")
    parser.add_argument("--eval-samples", type=int, default=100, help="samples per class at each evaluation")
    parser.add_argument("--no-retrain", action="store_true", help="skip the retrain oracle (minutes)")
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmarks"))
    args = parser.parse_args()

    accelerator = make_accelerator()
    task = load_task(args.model, accelerator=accelerator)
    classifier = load_task(task.preset.eval_classifier, accelerator=accelerator).model
    split = make_forget_split(task.train_data, task.test_data, SplitSpec("class", classes=(args.forget_class,)))
    remaining = [c for c in range(task.num_classes) if c != args.forget_class]
    fid = fid_setup("classifier", classifier, task.preset.eval_classifier, "torchmetrics", None, accelerator.device)
    reference = reference_features(reference_images(task, split.retain, remaining), fid)
    protocol = SamplingProtocol(per_class=args.eval_samples, guidance=task.preset.sampling.guidance, steps=task.preset.sampling.steps)

    def evaluate(model) -> dict:
        pipeline = pipeline_for(task, model)
        return generator_metrics(pipeline, classifier, [args.forget_class], remaining, reference, fid, protocol, accelerator)[0]

    results = {"model": args.model, "class": args.forget_class, "protocol": {**protocol.__dict__, **fid.describe()},
               "original": evaluate(task.model), "methods": {}}
    for method in args.methods:
        results["methods"][method] = curve(task, split, method, args.every, evaluate, accelerator, args.steps)
    if not args.no_retrain:
        spec, cfg = method_config("retrain", task.preset, {})
        started = time.perf_counter()
        retrained = spec.run(task, split, cfg, accelerator, checkpoint_dir=None, resume=False)
        results["retrain"] = {"wall_time_s": time.perf_counter() - started, "steps": retrained.steps, **evaluate(retrained.model)}

    if accelerator.is_main_process:
        args.output.mkdir(parents=True, exist_ok=True)
        stem = args.output / f"forget_curve-{args.model}"
        atomic_write_text(stem.with_suffix(".json"), json.dumps(results, indent=2))
        plot(results, stem.with_suffix(".png"))
        retrain_time = results.get("retrain", {}).get("wall_time_s")
        print(f"\n{'method':>13s} {'steps':>6s} {'forget_acc':>10s} {'fid_remain':>10s} {'wall s':>8s} {'x retrain':>9s}")
        rows = [(m, e["steps"], e["curve"][-1], e["wall_time_s"]) for m, e in results["methods"].items()]
        if "retrain" in results:
            rows.append(("retrain", results["retrain"]["steps"], results["retrain"], retrain_time))
        original = results["original"]
        print(f"{'original':>13s} {'':>6s} {original['forget_acc']:10.3f} {original['fid_remain']:10.3f}")
        for name, steps, last, wall in rows:
            ratio = f"{wall / retrain_time:9.3f}" if retrain_time else ""
            print(f"{name:>13s} {steps:6d} {last['forget_acc']:10.3f} {last['fid_remain']:10.3f} {wall:8.1f} {ratio}")
        print(f"wrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
