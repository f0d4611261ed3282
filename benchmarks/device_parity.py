"""Device parity: the same small jobs, from the same weights and seeds, on two devices, compared stage by stage.

    python benchmarks/device_parity.py --cpu-only       # the CPU at 1 thread against the CPU at 2 (no GPU needed)
    python benchmarks/device_parity.py                  # the CPU against the GPU, both on this machine
    python benchmarks/device_parity.py --prepare-only --inputs DIR   # write the weights to carry to a GPU machine

Jobs (seeds 0 1 2 each): ddpm-digits SFR-on (class 3), sd-digits SFR-on and ESD-u (the concept "a handwritten digit
three"; SFR-on on the real captioned digits, ESD data-free, 200 iterations as esd_sd.py), resnet18-digits SSD (class
3). Every device starts from the same weights (``--inputs``: each preset pretrained once on the CPU and exported, the
judge included) and runs in its own process (accelerate fixes one device per process). Stages compared:

- the noise: a step's draws (``genunlearn.noise``) on each device, bit for bit;
- the gradient statistics: SFR-on's forget and retain Fishers, SSD's importances (relative error of the sums, the
  largest relative error of an entry above 1e-3 of the largest), and the mask each gives (Jaccard);
- the first step's losses (relative difference);
- the final figures of the whole forget run (forget accuracy, remain/retain accuracy, FID ratio): the devices' means
  over the seeds lie within one seed-std (the larger of the two) of each other.

Prints a table and writes benchmarks/results/device_parity/<device A>__<device B>.json (small; committed). Worker
files (Fishers, masks) stay under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESULTS = Path(__file__).resolve().parent / "results" / "device_parity"
CONCEPT = "a handwritten digit three"
JOBS = {  # name: (preset, method, forget, method settings)
    "ddpm-sfron": ("ddpm-digits", "sfron", {"classes": [3]}, {}),
    "sd-sfron": ("sd-digits", "sfron", {"concepts": [CONCEPT], "data": "real"}, {}),
    "sd-esd": ("sd-digits", "esd", {"concepts": [CONCEPT]}, {"steps": 200}),
    "resnet-ssd": ("resnet18-digits", "ssd", {"classes": [3]}, {"alpha": 8.5}),  # a fixed α: one mask to compare
}
JUDGE = "cnn-digits"
FINAL = {"classifier": ("forget_acc", "retain_acc", None), "diffusion": ("forget_acc", "remain_acc", "fid_remain"),
         "text-to-image": ("forget_acc", "remain_acc", "fid_remain")}


# ---------------------------------------------------------------- inputs: the weights every device starts from

def _export(preset: str, folder: Path, cache_dir: str | None) -> None:
    from genunlearn.runs.pretrain import run_pretrain

    if not folder.is_dir():
        print(f"exporting {preset} to {folder}", flush=True)
        run_pretrain(preset, cache_dir=cache_dir, output_dir=folder)


def prepare_inputs(inputs: Path, jobs: list[str], cache_dir: str | None) -> None:
    """Export each job's preset and the judge, pretrained (or cached) on the CPU, into ``inputs/<preset>``, and the
    captioned digits as an image folder for the jobs that train on real captioned images."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from concept_erasure import RETAIN, real_captioned_folder

    inputs.mkdir(parents=True, exist_ok=True)
    for preset in dict.fromkeys([JUDGE, *(JOBS[name][0] for name in jobs)]):
        _export(preset, inputs / preset, cache_dir)
    if any(JOBS[name][2].get("data") == "real" for name in jobs):
        real_captioned_folder(inputs / "captioned-digits", [CONCEPT, *RETAIN])


def forget_job(name: str, seed: int, inputs: Path, work: Path, cache_dir: Path):
    """The ForgetJob of job ``name`` and ``seed`` from the exported weights."""
    from genunlearn.runs.job import ForgetJob

    preset, method, target, settings = JOBS[name]
    target = dict(target)
    if target.get("data") == "real":
        target["data"] = str(inputs / "captioned-digits")
    weights = inputs / preset
    judge = inputs / JUDGE / "model.safetensors"
    evaluation = {} if preset == "resnet18-digits" else {"eval_classifier_weights": str(judge)}
    return ForgetJob(model=preset, method=method, output_dir=work / f"{name}-s{seed}", settings=dict(settings), seed=seed,
                     pretrained=str(weights), cache_dir=str(cache_dir), **target, **evaluation)


# ---------------------------------------------------------------- one device

def statistics(job, accelerator) -> dict[str, torch.Tensor]:
    """The job's gradient statistics and mask, as the method computes them (SFR-on's Fishers, SSD's importances)."""
    from genunlearn.engine.masks import fisher_ratio_mask
    from genunlearn.engine.saliency import cached_gradient_statistics
    from genunlearn.kinds import kind_of
    from genunlearn.methods.registry import method_config
    from genunlearn.methods.ssd import ssd_importances
    from genunlearn.methods.ssd_alpha import default_alpha
    from genunlearn.models.presets import get_preset

    preset = get_preset(job.model)
    run = kind_of(preset).prepare_run(job, preset, accelerator)
    task, split = run.task, run.split
    _, cfg = method_config(job.method, preset, {"seed": job.seed, **job.settings})
    names = [n for n, _ in task.model.named_parameters()]
    if job.method == "sfron":
        batch = cfg.fisher_batch_size or cfg.batch_size * accelerator.num_processes
        stats = [cached_gradient_statistics(task.cache_dir, task.model.to(accelerator.device), task.importance_loss,
                                            task.importance_loss_id, getattr(split, part), accelerator, batch_size=batch,
                                            max_norm=cfg.fisher_clip, batches=cfg.fisher_batches, seed=cfg.seed,
                                            stream=f"fisher {part}")[0] for part in ("forget", "retain")]
        mask = fisher_ratio_mask(names, stats[0], stats[1], cfg.mask_threshold).keep
    elif job.method == "ssd":
        task.cache_dir = None
        stats = list(ssd_importances(task, task.model.to(accelerator.device), split, cfg, accelerator, False)[:2])
        alpha = cfg.alpha or default_alpha(task.model, split.spec.kind)
        mask = [f > alpha * w for w, f in zip(stats[0], stats[1])]
    else:
        return {}
    out = {f"{which}.{n}": t.detach().cpu().float() for which, part in zip(("a", "b"), stats) for n, t in zip(names, part)}
    out.update({f"mask.{n}": k.cpu().to(torch.uint8) for n, k in zip(names, mask)})
    return out


def first_step(job, accelerator) -> dict[str, float]:
    """The figures the loop logs at its first step (the losses, gradient norms)."""
    import dataclasses

    from genunlearn.kinds import kind_of
    from genunlearn.methods.registry import method_config
    from genunlearn.models.presets import get_preset

    preset = get_preset(job.model)
    spec, cfg = method_config(job.method, preset, {"seed": job.seed, **job.settings})
    if not hasattr(cfg, "log_every"):
        return {}  # no loop (SSD): nothing logged per step
    cfg = dataclasses.replace(cfg, steps=1, log_every=1)
    run = kind_of(preset).prepare_run(job, preset, accelerator)
    result = spec.run(run.task, run.split, cfg, accelerator, checkpoint_dir=None, resume=False)
    return {k: v for k, v in result.log[0].items() if k not in ("step", "lr")}


def worker(args: argparse.Namespace) -> None:
    """Every stage of every job and seed on one device; figures to ``--out``.json, tensors beside it."""
    import dataclasses

    from genunlearn.distributed import make_accelerator
    from genunlearn.engine.loop import step_noise
    from genunlearn.runs.forget import run_forget_job
    from genunlearn.runs.job import finished_report

    threads = args.threads[0]
    torch.set_num_threads(threads)
    accelerator = make_accelerator(cpu=args.device == "cpu")
    work = args.out.parent / args.out.stem
    record = {"device": args.device, "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "threads": threads, "torch": torch.__version__, "jobs": {}}
    for name in args.jobs:
        for seed in args.seeds:
            started = time.perf_counter()
            job = forget_job(name, seed, args.inputs, work / "runs", work / "cache")
            noise = step_noise(seed, 0, accelerator).randn((4, 4, 8, 8), accelerator.device).cpu()
            tensors = {"noise": noise, **statistics(job, accelerator)}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(work / f"{name}-s{seed}.safetensors"))
            losses = first_step(dataclasses.replace(job, output_dir=work / "first" / f"{name}-s{seed}"), accelerator)
            report = finished_report(job) or run_forget_job(job, accelerator)
            keys = [k for k in FINAL[report["kind"]] if k is not None]
            record["jobs"][f"{name}/{seed}"] = {"first_step": losses, "before": {k: report["before"][k] for k in keys},
                                                "after": {k: report["after"][k] for k in keys},
                                                "seconds": time.perf_counter() - started}
            print(f"{args.device} ({threads} threads): {name} seed {seed} in {time.perf_counter() - started:.0f} s", flush=True)
    args.out.write_text(json.dumps(record, indent=1))


# ---------------------------------------------------------------- comparing two devices

def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def compare_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Noise equality, the statistics' relative errors and the masks' Jaccard index of one job and seed."""
    out = {"noise_equal": bool(torch.equal(a["noise"], b["noise"]))}
    for which, label in (("a", "stat_forget"), ("b", "stat_retain")):
        names = [k for k in a if k.startswith(f"{which}.")]
        if names:
            flat_a, flat_b = (torch.cat([t[k].flatten() for k in names]) for t in (a, b))
            large = flat_a.abs() > 1e-3 * flat_a.abs().max()
            out[f"{label}_sum_rel"] = float((flat_a.sum() - flat_b.sum()).abs() / flat_a.sum().abs().clamp_min(1e-30))
            out[f"{label}_rel"] = relative(flat_a, flat_b)
            out[f"{label}_max_entry_rel"] = float(((flat_a - flat_b).abs() / flat_a.abs())[large].max())
    masks = [k for k in a if k.startswith("mask.")]
    if masks:
        mask_a, mask_b = (torch.cat([t[k].flatten().bool() for k in masks]) for t in (a, b))
        union = int((mask_a | mask_b).sum())
        out["mask_jaccard"] = int((mask_a & mask_b).sum()) / union if union else 1.0
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0


def compare(a: dict, b: dict, work_a: Path, work_b: Path, jobs: list[str], seeds: list[int]) -> list[dict]:
    rows = []
    for name in jobs:
        per_seed = [compare_tensors(load_file(str(work_a / f"{name}-s{s}.safetensors")),
                                    load_file(str(work_b / f"{name}-s{s}.safetensors"))) for s in seeds]
        row = {"job": name, "noise_equal": all(p["noise_equal"] for p in per_seed)}
        for key in ("stat_forget_rel", "stat_retain_rel", "stat_forget_max_entry_rel", "stat_retain_max_entry_rel"):
            if key in per_seed[0]:
                row[key] = max(p[key] for p in per_seed)
        if "mask_jaccard" in per_seed[0]:
            row["mask_jaccard"] = min(p["mask_jaccard"] for p in per_seed)
        firsts = [(a["jobs"][f"{name}/{s}"]["first_step"], b["jobs"][f"{name}/{s}"]["first_step"]) for s in seeds]
        if firsts[0][0]:
            row["first_step_rel"] = max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-30) for x, y in firsts for k in x)
        row["final"] = {}
        for figure in a["jobs"][f"{name}/{seeds[0]}"]["after"]:
            def values(record: dict) -> list[float]:
                runs = [record["jobs"][f"{name}/{s}"] for s in seeds]
                if figure.startswith("fid"):
                    return [r["after"][figure] / r["before"][figure] for r in runs]
                return [r["after"][figure] for r in runs]

            (mean_a, std_a), (mean_b, std_b) = mean_std(values(a)), mean_std(values(b))
            label = "fid_ratio" if figure.startswith("fid") else figure
            row["final"][label] = {"a": [mean_a, std_a], "b": [mean_b, std_b], "values_a": values(a), "values_b": values(b),
                                   # (plus float rounding: one seed has no spread, and two thread counts differ in the
                                   # last digits of an FID)
                                   "within_one_std": abs(mean_a - mean_b) <= max(std_a, std_b) + 1e-6 * abs(mean_a)}
        rows.append(row)
    return rows


def render(rows: list[dict], label_a: str, label_b: str, seeds: list[int]) -> str:
    lines = [f"Device parity: {label_a} (a) against {label_b} (b), seeds {' '.join(map(str, seeds))}", "",
             "| job | noise bit-equal | Fisher/importance rel. error (forget, retain) | mask Jaccard | first step rel. | "
             "final: a mean ± std | final: b mean ± std | within one std |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        stats = ", ".join(f"{r[k]:.1e}" for k in ("stat_forget_rel", "stat_retain_rel") if k in r) or "n/a"
        jaccard = f"{r['mask_jaccard']:.4f}" if "mask_jaccard" in r else "n/a"
        first = f"{r['first_step_rel']:.1e}" if "first_step_rel" in r else "n/a"
        final_a = "; ".join(f"{k} {v['a'][0]:.3f} ± {v['a'][1]:.3f}" for k, v in r["final"].items())
        final_b = "; ".join(f"{k} {v['b'][0]:.3f} ± {v['b'][1]:.3f}" for k, v in r["final"].items())
        within = "; ".join(f"{k} {'yes' if v['within_one_std'] else 'NO'}" for k, v in r["final"].items())
        lines.append(f"| {r['job']} | {'yes' if r['noise_equal'] else 'NO'} | {stats} | {jaccard} | {first} | {final_a} | "
                     f"{final_b} | {within} |")
    return "\n".join(lines)


def run_worker(device: str, threads: int, args: argparse.Namespace, label: str) -> tuple[dict, Path]:
    out = args.work / f"{label}.json"
    if not out.is_file():
        command = [sys.executable, __file__, "--worker", "--device", device, "--threads", str(threads), "--out", str(out),
                   "--inputs", str(args.inputs), "--jobs", *args.jobs, "--seeds", *map(str, args.seeds)]
        environment = {**os.environ, "GENUNLEARN_THREADS": str(threads)}
        if device == "cpu":
            environment["CUDA_VISIBLE_DEVICES"] = ""
        subprocess.run(command, check=True, env=environment)
    return json.loads(out.read_text()), args.work / label


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--cpu-only", action="store_true", help="compare the CPU at --threads A against B (no GPU needed)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="CPU threads: two counts with --cpu-only (default 1 2), one otherwise (default: all cores)")
    parser.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--inputs", type=Path, default=Path("outputs/benchmarks/device_parity/inputs"),
                        help="the exported weights every device starts from (made here on first use)")
    parser.add_argument("--work", type=Path, default=Path("outputs/benchmarks/device_parity/work"),
                        help="each device's runs, caches and tensors (a finished device is reused)")
    parser.add_argument("--prepare-only", action="store_true", help="only export the inputs (to carry to a GPU machine)")
    parser.add_argument("--cache-dir", help="where the presets are pretrained and cached (default: $GENUNLEARN_CACHE)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if not (args.inputs / JUDGE).is_dir() or args.prepare_only:
        prepare_inputs(args.inputs, args.jobs, args.cache_dir)
    if args.prepare_only:
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if args.cpu_only:
        threads = args.threads or [1, 2]
        if len(threads) != 2:
            raise SystemExit("error: --cpu-only compares two thread counts, e.g. --threads 1 2")
        sides = [("cpu", threads[0], f"cpu-{threads[0]}t"), ("cpu", threads[1], f"cpu-{threads[1]}t")]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: no GPU here; compare two CPU thread counts with --cpu-only")
        cores = (args.threads or [os.cpu_count() or 1])[0]
        sides = [("cpu", cores, f"cpu-{cores}t"), ("cuda", cores, "cuda")]
    (record_a, work_a), (record_b, work_b) = (run_worker(device, threads, args, label) for device, threads, label in sides)
    label_a = f"{record_a['device_name']} ({record_a['threads']} threads)"
    label_b = record_b["device_name"] if record_b["device"] == "cuda" else f"cpu ({record_b['threads']} threads)"
    rows = compare(record_a, record_b, work_a, work_b, args.jobs, args.seeds)
    table = render(rows, label_a, label_b, args.seeds)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"{sides[0][2]}__{record_b['device_name'].replace(' ', '-') if record_b['device'] == 'cuda' else sides[1][2]}"
    result = {"a": {k: v for k, v in record_a.items() if k != "jobs"}, "b": {k: v for k, v in record_b.items() if k != "jobs"},
              "seeds": args.seeds, "rows": rows,
              "seconds": {side: {k: v["seconds"] for k, v in record["jobs"].items()} for side, record in (("a", record_a), ("b", record_b))}}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {RESULTS / f'{name}.json'}")


if __name__ == "__main__":
    main()
