"""The forget stage, once for every kind: load, split, evaluate, unlearn, evaluate, compare to the oracle, write."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

from accelerate import Accelerator

import genunlearn
from genunlearn.distributed import make_accelerator
from genunlearn.engine.checkpoint import check_resumable
from genunlearn.engine.relearn import relearn_curve, retrain_oracle
from genunlearn.errors import UserError
from genunlearn.eval.costs import CostMeter, folder_mib
from genunlearn.eval.report import REPORT_FILES, SCHEMA_VERSION, summary_line, write_report
from genunlearn.eval.seeds import aggregate_reports, write_summary
from genunlearn.kinds import kind_of
from genunlearn.kinds.base import Kind, Run
from genunlearn.methods import UnlearnResult
from genunlearn.methods.registry import MethodSpec, method_config
from genunlearn.models.presets import Preset, get_preset
from genunlearn.precision import accelerate_mixed_precision
from genunlearn.runs.logs import LOGGER, run_log
from genunlearn.runs.provenance import provenance, utc_now
from genunlearn.runs.tracking import experiment_trackers, tracker_names
from genunlearn.runs.job import CHECKPOINTS, LOG_FILE, RUN_FILE, ForgetJob, check_output_dir, finished_report
from genunlearn.storage.cache import cache_root, writable_cache_root
from genunlearn.storage.files import atomic_write_text, nonfinite_entries
from genunlearn.storage.lock import main_process_lock


def run_report(kind: str, job: ForgetJob, preset: Preset, run: Run, cfg, result: UnlearnResult,
               accelerator: Accelerator, **entries) -> dict:
    """The report's common keys (see ``genunlearn.eval.report``) followed by ``entries``."""
    return {
        "schema_version": SCHEMA_VERSION,
        "genunlearn_version": genunlearn.__version__,
        "kind": kind,
        "model": preset.name,
        "class": job.forgotten(),
        "method": job.method,
        "steps": result.steps,
        "wall_time_s": result.wall_time_s,
        "processes": accelerator.num_processes,
        "split": run.split.summary(),
        "class_names": list(run.split.train.classes),
        "config": dataclasses.asdict(cfg),
        "method_info": result.info,
        "memory": {"sharding": "fsdp2" if result.info.get("sharded_over") else "ddp" if accelerator.num_processes > 1 else "none",
                   "gradient_checkpointing": job.gradient_checkpointing,
                   "offload_frozen": bool(getattr(cfg, "offload_frozen", False))},
        "log": result.log,
        **entries,
    }


def tracked_figures(prefix: str, metrics: dict) -> dict[str, float]:
    """The numeric figures of ``metrics`` as tracker scalars named ``prefix/name``."""
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def oracle_gaps(after: dict, oracle: dict) -> dict:
    """``after - oracle`` for every numeric figure both hold (positive: the unlearned model scores higher)."""
    return {k: after[k] - oracle[k] for k in after
            if isinstance(after[k], (int, float)) and isinstance(oracle.get(k), (int, float)) and not k.endswith("_time_s")}


def oracle_and_relearning(job: ForgetJob, run: Run, unlearned, after: dict, accelerator: Accelerator) -> dict:
    """The report entries ``--compare-retrain`` and ``--relearn-steps`` ask for: the retrain oracle's metrics and
    the gaps to them (``oracle``, ``gap_to_oracle``), and relearning curves of the unlearned model and the
    oracle (``relearn``); called when the job asks for either."""
    task, split = run.task, run.split
    oracle = retrain_oracle(task, split, run.data_id, cache_root(job.cache_dir), accelerator, *run.oracle_store())
    entries = {}
    if job.compare_retrain:
        with accelerator.autocast():
            oracle_metrics = run.evaluate(oracle)[0]
        entries.update(oracle=oracle_metrics, gap_to_oracle=oracle_gaps(after, oracle_metrics))
    if job.relearn_steps:
        entries["relearn"] = {
            "steps": job.relearn_steps,
            "samples": job.relearn_samples,
            "lr": task.preset.train.lr if job.relearn_lr is None else job.relearn_lr,
            **{name: relearn_curve(task, model, split, job.relearn_steps, run.forget_accuracy, accelerator,
                                   samples=job.relearn_samples, seed=job.seed, lr=job.relearn_lr)
               for name, model in (("unlearned", unlearned), ("retrain", oracle))},
        }
    return entries


def run_forget_job(job: ForgetJob, accelerator: Accelerator | None = None) -> dict:
    """Run ``job`` and return its report (also written to ``job.output_dir`` by the main process)."""
    accelerate_mixed_precision(job.mixed_precision)  # a UserError for an unknown setting
    job.check_counts()
    accelerator = accelerator or make_accelerator(mixed_precision=job.mixed_precision, tf32=job.tf32)
    preset = get_preset(job.model)
    kind = kind_of(preset)
    method, cfg = method_config(job.method, preset, {"seed": job.seed, **job.settings})
    method.check_kind(kind.name, preset.name)
    method.check_shards(accelerator)
    kind.check_job(job)  # a bad --class/--concept/... is named before the output folder is touched
    tracker_names(job.report_to)
    writable_cache_root(job.cache_dir)
    with main_process_lock(job.output_dir, accelerator):
        return _run_holding_the_folder(job, preset, kind, method, cfg, accelerator)


def _run_holding_the_folder(job: ForgetJob, preset: Preset, kind: Kind, method: MethodSpec, cfg, accelerator: Accelerator) -> dict:
    started_at = utc_now()
    resumed_with = check_output_dir(job)
    resume = job.resume_from()
    if resume and hasattr(cfg, "steps"):
        check_resumable(resume if isinstance(resume, Path) else job.output_dir / CHECKPOINTS, cfg.steps)
    accelerator.wait_for_everyone()  # every process has checked before the main process writes run.json
    if accelerator.is_main_process:
        job.output_dir.mkdir(parents=True, exist_ok=True)
    with run_log(job.output_dir, accelerator):
        LOGGER.debug("command: %s", " ".join(sys.argv))
        LOGGER.debug("run: %s%s", json.dumps(job.identity()), f"; resumed with {resumed_with}" if resumed_with else "")
        report = _forget(job, preset, kind, method, cfg, accelerator, resume, resumed_with, started_at)
        LOGGER.debug("finished: %s", summary_line(report, job.output_dir))
    return report


def _forget(job: ForgetJob, preset: Preset, kind: Kind, method: MethodSpec, cfg, accelerator: Accelerator,
            resume: bool | Path, resumed_with: dict, started_at: str) -> dict:
    meter = CostMeter(accelerator)
    with meter.stage("data"):
        run = kind.prepare_run(job, preset, accelerator)
    if accelerator.is_main_process:
        atomic_write_text(job.output_dir / RUN_FILE, json.dumps(job.run_record(), indent=2))
    tracked = {"model": preset.name, "method": job.method, "class": job.forgotten(), **dataclasses.asdict(cfg)}
    with experiment_trackers(job.report_to, job.output_dir, accelerator, tracked):
        with meter.stage("evaluation_before"), accelerator.autocast():  # before and after at the run's precision alike
            before, shown_before = run.evaluate_before()
        accelerator.log(tracked_figures("before", before), step=0)
        with meter.stage("unlearning"):
            result = method.run(run.task, run.split, cfg, accelerator, checkpoint_dir=job.output_dir / CHECKPOINTS,
                                resume=resume)
        meter.move(result.info.get("mask_time_s"), "unlearning", "statistics")
        check_publishable(result.model, job.method)
        with meter.stage("evaluation_after"), accelerator.autocast():
            after, shown_after = run.evaluate(result.model)
        accelerator.log(tracked_figures("after", after), step=result.steps)
    with meter.stage("exports"), accelerator.autocast():
        extras = run.exports(result.model)
    if job.compare_retrain or job.relearn_steps:
        with meter.stage("oracle_and_relearning"):
            extras.update(oracle_and_relearning(job, run, result.model, after, accelerator))
    if job.attacks:
        with meter.stage("attacks"), accelerator.autocast():
            extras["attacks"] = run.attack(result.model)
    if resumed_with:
        extras["resumed_with"] = resumed_with
    report = run_report(kind.name, job, preset, run, cfg, result, accelerator, **run.report_entries(),
                        before=before, after=after, weights=run.weights, **extras, **provenance(accelerator, started_at))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with meter.stage("writing"):
            loading = run.write(accelerator.unwrap_model(result.model), job.output_dir, shown_before, shown_after)
    report["cost"] = meter.section()
    if accelerator.is_main_process:
        report["cost"]["output_mib"] = folder_mib(job.output_dir, leave_out=(CHECKPOINTS, RUN_FILE, LOG_FILE, *REPORT_FILES))
        started_from = job.pretrained or (preset.hub_id or "").removeprefix("local-dir:") or None
        write_report(job.output_dir, report, base_model=started_from, loading=loading)
        shutil.rmtree(job.output_dir / CHECKPOINTS, ignore_errors=True)
    accelerator.wait_for_everyone()
    return report


def check_publishable(model, method: str) -> None:
    """A UserError when the unlearned model holds NaN or inf in any parameter or buffer: nothing is published."""
    bad = nonfinite_entries(model.state_dict())
    if bad:
        raise UserError(f"{method} left non-finite values in {', '.join(bad[:3])}; nothing was published; lower the "
                        "method's step size (--lr, or its own settings) and run again")


def run_seeds(job: ForgetJob, seeds: list[int], accelerator: Accelerator | None = None) -> dict:
    """Run ``job`` once per seed into ``output_dir/seed-<s>`` (finished seeds are reused, so a killed series
    continues) and write the mean ± std of every figure to ``output_dir/summary.{json,md}``; return the summary."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError("--seeds needs one or more distinct seeds, e.g. --seeds 0 1 2")
    accelerator = accelerator or make_accelerator(mixed_precision=job.mixed_precision, tf32=job.tf32)
    runs = [f"seed-{seed}" for seed in seeds]
    reports = []
    for seed, run in zip(seeds, runs):
        one = dataclasses.replace(job, seed=seed, output_dir=job.output_dir / run)
        finished = finished_report(one)
        if finished is not None and accelerator.is_main_process:
            shutil.rmtree(one.output_dir / CHECKPOINTS, ignore_errors=True)  # left by a kill after the last write
        reports.append(finished or run_forget_job(one, accelerator))
    summary = aggregate_reports(reports, seeds, runs)
    if accelerator.is_main_process:
        write_summary(job.output_dir, summary)
    accelerator.wait_for_everyone()
    return summary
