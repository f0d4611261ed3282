"""The evaluate stage (``genunlearn evaluate``): measure a model as it is, without unlearning, with the same metrics
and protocol as a forget run (so an evaluation of an unlearned model and of its original compare figure by figure)."""

from __future__ import annotations

import json
import sys

from accelerate import Accelerator

import genunlearn
from genunlearn.distributed import make_accelerator
from genunlearn.errors import UserError
from genunlearn.eval.costs import CostMeter, folder_mib
from genunlearn.eval.grids import SAMPLES_FILE
from genunlearn.eval.report import SCHEMA_VERSION, render_evaluation
from genunlearn.kinds import kind_of
from genunlearn.models.presets import get_preset
from genunlearn.runs.job import LOG_FILE, ForgetJob
from genunlearn.runs.logs import LOGGER, run_log
from genunlearn.runs.provenance import provenance, utc_now
from genunlearn.storage.cache import writable_cache_root
from genunlearn.storage.files import atomic_write_text
from genunlearn.storage.lock import main_process_lock

EVALUATION_FILE = "evaluation.json"


def run_evaluation(job: ForgetJob, accelerator: Accelerator | None = None) -> dict:
    """Evaluate ``job``'s model (method and unlearning settings are ignored) and write ``evaluation.json``,
    ``evaluation.md`` and, for generators, ``samples.png`` (a labelled row per class) to ``job.output_dir``."""
    job.check_counts()
    accelerator = accelerator or make_accelerator(mixed_precision=job.mixed_precision, tf32=job.tf32)
    preset = get_preset(job.model)
    kind = kind_of(preset)
    kind.check_evaluation(job)
    writable_cache_root(job.cache_dir)
    out, started_at = job.output_dir, utc_now()
    with main_process_lock(out, accelerator):
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} is not empty; choose a new --output-dir")
        with run_log(out, accelerator):
            LOGGER.debug("command: %s", " ".join(sys.argv))
            meter = CostMeter(accelerator)
            with meter.stage("evaluation"), accelerator.autocast():
                entries, draw_samples = kind.evaluate_model(job, preset, accelerator)
            meter.move(sum(a["seconds"] for a in entries.get("attacks", {}).values()), "evaluation", "attacks")
            report = {"schema_version": SCHEMA_VERSION, "genunlearn_version": genunlearn.__version__, "kind": kind.name,
                      "model": preset.name, "pretrained": job.pretrained, "class": job.forgotten(), "seed": job.seed,
                      "processes": accelerator.num_processes, **entries, **provenance(accelerator, started_at)}
            if accelerator.is_main_process:
                with meter.stage("writing"):
                    if draw_samples is not None:
                        draw_samples(out / SAMPLES_FILE)
            report["cost"] = meter.section()
            if accelerator.is_main_process:
                report["cost"]["output_mib"] = folder_mib(out, leave_out=(LOG_FILE,))
                atomic_write_text(out / EVALUATION_FILE, json.dumps(report, indent=2))
                shown = SAMPLES_FILE if draw_samples is not None else None
                atomic_write_text(out / "evaluation.md", render_evaluation(report, shown, job.classes))
            accelerator.wait_for_everyone()
    return report
