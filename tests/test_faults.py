"""Faults a run must survive with nothing lost: concurrent runs into one folder, locks left by killed processes,
caches filled by two jobs at once."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import accelerate_command, accelerate_launch, exact_text, export_digits_folder, interrupted_at
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import genunlearn as gu
from genunlearn import UserError
from genunlearn.cli import compare_main, evaluate_main, forget_main, guarded
from genunlearn.data.folders import ImageFolderDataset, default_transform
from genunlearn.methods import random_label
from genunlearn.storage.cache import pretrain_once
from genunlearn.storage.lock import acquire, lock_path, release

REPO = Path(__file__).resolve().parents[1]


def start_forget(args: list[str], cache_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "genunlearn", "forget", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "GENUNLEARN_CACHE": str(cache_dir)})


def wait_for(condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def dead_pid() -> int:
    """The pid of a process that has exited."""
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid


def one_error_line(capsys) -> str:
    """The one ``error:`` line on stderr (progress bars of work done before the fault may precede it), no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err and err.rstrip().endswith(errors[0]), err
    return errors[0]


def test_a_second_run_into_a_folder_in_use_is_refused_and_the_first_finishes(cnn_task, cache_dir, tmp_path, capsys):
    out = tmp_path / "race"
    first = start_forget(["--model", "cnn-digits", "--class", "1", "--method", "sfron", "--steps", "150", "--output-dir", str(out)],
                         cache_dir)
    wait_for(lambda: lock_path(out).exists() or first.poll() is not None)
    assert guarded(forget_main, ["--model", "cnn-digits", "--class", "1", "--method", "finetune", "--steps", "5",
                                 "--output-dir", str(out)]) == 2
    assert "is in use by another genunlearn run (pid" in one_error_line(capsys)
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "sfron" and json.loads((out / "run.json").read_text())["method"] == "sfron"
    assert not lock_path(out).exists()  # released when the run ends


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_message(cnn_task, cache_dir, tmp_path):
    out = tmp_path / "killed"
    victim = start_forget(["--model", "cnn-digits", "--class", "3", "--method", "sfron", "--steps", "200",
                           "--checkpoint-every", "50", "--output-dir", str(out)], cache_dir)
    wait_for(lambda: (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()) or victim.poll() is not None)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert lock_path(out).exists() and not (out / "report.json").exists()
    resumed = start_forget(["--model", "cnn-digits", "--class", "3", "--method", "sfron", "--steps", "200",
                            "--checkpoint-every", "50", "--output-dir", str(out), "--resume_from_checkpoint", "latest"], cache_dir)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert f"taking over the stale lock {lock_path(out)}" in err and f"pid {victim.pid}" in err
    assert (out / "report.json").is_file() and not lock_path(out).exists()


def test_locks_of_live_dead_and_half_written_owners(tmp_path):
    folder = tmp_path / "entry"
    held = acquire(folder, wait=False)
    with pytest.raises(UserError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
        acquire(folder, wait=False)
    release(held)
    assert not held.exists()
    held.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    release(acquire(folder, wait=False))  # a dead owner's lock is taken over
    held.write_text(json.dumps({"pid": 1, "host": "another-machine"}))
    with pytest.raises(UserError, match=f"delete {held}"):  # another machine's owner cannot be checked: never taken over
        acquire(folder, wait=False)
    held.write_text("")
    with pytest.raises(UserError, match="in use"):  # being written right now
        acquire(folder, wait=False)
    os.utime(held, (time.time() - 60, time.time() - 60))
    release(acquire(folder, wait=False))  # empty for a minute: its writer died


def test_a_cache_entry_being_filled_by_another_job_is_waited_for_and_used(tmp_path, capsys):
    entry = tmp_path / "models" / "entry"
    other = subprocess.Popen([sys.executable, "-c", f"""
import time
from genunlearn.storage.lock import acquire, release
from pathlib import Path
held = acquire(Path({str(entry)!r}), wait=False)
time.sleep(2)
Path({str(entry)!r}).mkdir(parents=True)
Path({str(entry)!r}, "done").write_text("the other job's result")
release(held)
"""])
    wait_for(lambda: lock_path(entry).exists() or other.poll() is not None)
    built = []
    pretrain_once(entry, "done", lambda: built.append(True), Accelerator(cpu=True), "a test entry")
    assert other.wait() == 0 and built == [] and (entry / "done").read_text() == "the other job's result"


def test_two_processes_into_a_locked_folder_stop_together_and_write_nothing(cnn_task, cache_dir, tmp_path):
    out = tmp_path / "locked"
    held = acquire(out, wait=False)
    try:
        done = accelerate_launch(REPO / "scripts" / "forget_class.py",
                                 ["--model", "cnn-digits", "--class", "3", "--output-dir", str(out)], cache_dir, port=29533)
    finally:
        release(held)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode != 0 and str(REPO / "genunlearn") not in done.stderr, done.stderr[-2000:]  # only the launcher's own report
    assert len(errors) == 1 and "is in use by another genunlearn run" in errors[0]  # said once, by the main process
    assert not out.exists()


@pytest.mark.parametrize("place, message", [("a-file", "is a file, not a folder"), ("a-file/run", "a-file is a file"),
                                            ("/proc/genunlearn-run", "cannot write /proc/genunlearn-run")])
def test_an_output_folder_that_cannot_be_written_is_one_error_line(place, message, cnn_task, tmp_path, capsys):
    (tmp_path / "a-file").write_text("precious")
    out = place if place.startswith("/") else str(tmp_path / place)
    for command in (forget_main, evaluate_main):
        assert guarded(command, ["--model", "cnn-digits", "--class", "3", "--output-dir", out]) == 2
        assert message in one_error_line(capsys)
    assert (tmp_path / "a-file").read_text() == "precious"


def test_an_unwritable_cache_is_named_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GENUNLEARN_CACHE", "/proc/genunlearn-cache")
    assert guarded(forget_main, ["--model", "cnn-digits", "--class", "3", "--output-dir", str(tmp_path / "run")]) == 2
    assert "the model cache /proc/genunlearn-cache is not writable" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [(["--log-every", "0"], "log_every must be at least 1"),
                                            (["--checkpoint-every", "-1"], "checkpoint_every at least 0")])
def test_loop_settings_out_of_range_are_refused(flags, message, tmp_path, capsys):
    assert guarded(forget_main, ["--model", "cnn-digits", "--class", "3", *flags, "--output-dir", str(tmp_path / "r")]) == 2
    assert message in one_error_line(capsys)


def test_compare_refuses_corrupt_and_foreign_reports_and_unwritable_outputs(cnn_task, tmp_path, capsys):
    run = tmp_path / "run"
    assert guarded(forget_main, ["--model", "cnn-digits", "--class", "3", "--steps", "2", "--output-dir", str(run)]) == 0
    capsys.readouterr()
    (tmp_path / "a-file").write_text("")
    assert guarded(compare_main, [str(run), "--output", str(tmp_path / "a-file" / "table")]) == 2
    assert "cannot write" in one_error_line(capsys)
    for text, message in (("{not json", "is not valid JSON"), ('{"kind": "classifier"}', "not a genunlearn forget report")):
        (run / "report.json").write_text(text)
        assert guarded(compare_main, [str(run)]) == 2
        assert message in one_error_line(capsys)


def test_an_error_after_a_progress_bar_gets_a_line_of_its_own(capsys):
    def failing(argv):
        bar = tqdm(range(3), desc="working", disable=False)  # a bar even where stderr is no terminal
        next(iter(bar))
        raise UserError("loss became NaN")

    assert guarded(failing, []) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: loss became NaN"


def test_a_run_that_stopped_before_its_first_checkpoint_does_not_block_a_corrected_rerun(cnn_task, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"model": "cnn-digits", "method": "sfron", "settings": {"lr": 1e3}}))
    assert guarded(forget_main, ["--model", "cnn-digits", "--class", "3", "--steps", "2", "--output-dir", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["settings"] == {"steps": 2}


def test_a_corrupt_run_file_beside_checkpoints_is_named(cnn_task, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (out / "run.json").write_text("{truncated")
    assert guarded(forget_main, ["--model", "cnn-digits", "--class", "3", "--steps", "2", "--output-dir", str(out),
                                 "--resume_from_checkpoint", "latest"]) == 2
    assert f"{out / 'run.json'} is corrupt" in one_error_line(capsys)


def test_a_truncated_fisher_cache_file_is_moved_aside_and_computed_again(cnn_task, class3_split, tmp_path):
    task = copy.copy(cnn_task)
    task.cache_dir = tmp_path
    clean = gu.unlearn(task, class3_split, "sfron", steps=2).model
    cached = sorted((tmp_path / "saliency").glob("*.safetensors"))[0]  # one of D_f's and D_r's Fishers
    cached.write_bytes(cached.read_bytes()[:64])
    with pytest.warns(UserWarning, match=f"the cache file {cached} is unreadable"):
        again = gu.unlearn(task, class3_split, "sfron", steps=2)
    assert again.info["mask_cached"] is False
    assert all(torch.equal(a, b) for a, b in zip(clean.state_dict().values(), again.model.state_dict().values()))
    assert cached.with_name(cached.name + ".corrupt").is_file() and cached.is_file()  # recomputed and written again


def test_staging_folders_left_by_a_killed_cache_write_are_removed(tmp_path):
    entry = tmp_path / "models" / "entry"
    leftover = tmp_path / "models" / ".entry.k1ll3d"
    (leftover / "half").mkdir(parents=True)
    other = tmp_path / "models" / ".other-entry.x"
    other.mkdir()

    def build() -> None:
        entry.mkdir()
        (entry / "done").write_text("")

    pretrain_once(entry, "done", build, Accelerator(cpu=True), "a test entry")
    assert (entry / "done").is_file() and not leftover.exists() and other.is_dir()


def test_swapping_images_between_classes_changes_the_folder_fingerprint_and_unchanged_files_are_not_reread(
        tmp_path, monkeypatch):
    root = export_digits_folder(tmp_path / "data", per_class=4)
    zero, one = root / "train" / "digit0" / "000.png", root / "train" / "digit1" / "000.png"
    zero.write_bytes(b"\x89PNG one image")
    one.write_bytes(b"\x89PNG two image")  # the same size: only the contents tell them apart
    transform = default_transform(8, 1)
    before = ImageFolderDataset(root, "train", transform).fingerprint()
    reads = []
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or real_read(self))
    assert ImageFolderDataset(root, "train", transform).fingerprint() == before and reads == []  # remembered, not re-read
    swap = tmp_path / "swap.png"
    zero.rename(swap)
    one.rename(zero)
    swap.rename(one)  # same names and sizes; each class now holds the other's image
    assert ImageFolderDataset(root, "train", transform).fingerprint() != before
    assert sorted(reads) == sorted([zero, one])  # only the two changed files were read again


def one_class_folder(root: Path, broken: str | None = None) -> Path:
    """ROOT/{train,test}/<class>/ with three 8x8 PNGs per class; ``broken``: a class whose first image is garbage."""
    for split in ("train", "test"):
        for name in ("a",) if broken is None else ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("L", (8, 8), 40 * i + (100 if name == "b" else 0)).save(root / split / name / f"{i}.png")
    if broken is not None:
        (root / "train" / broken / "0.png").write_bytes(b"not an image")
    return root


@pytest.mark.parametrize("case, message", [
    ("empty-pt", "is corrupt or unreadable (EOFError)"),
    ("nan-weights", "hold NaN or infinite values"),
    ("garbage-yaml", "is not valid YAML (line 3)"),
    ("image-size-text", "image_size must be int, got 'eight'"),
    ("one-class-folder", "holds 1 class; a classifier, and forgetting, need at least two"),
    ("corrupt-png", "0.png is not a readable image (UnidentifiedImageError)"),
])
def test_small_faults_are_one_error_line(case, message, cnn_task, tmp_path, capsys):
    args = ["--model", "cnn-digits", "--class", "0"]
    if case == "empty-pt":
        (tmp_path / "w.pt").write_bytes(b"")
        args += ["--pretrained", str(tmp_path / "w.pt")]
    elif case == "nan-weights":
        save_file({k: v * float("nan") if v.is_floating_point() else v for k, v in cnn_task.model.state_dict().items()},
                  str(tmp_path / "w.safetensors"))
        args += ["--pretrained", str(tmp_path / "w.safetensors")]
    elif case in ("garbage-yaml", "image-size-text"):
        preset = (REPO / "genunlearn" / "configs" / "models" / "cnn-digits.yaml").read_text()
        text = "name: x\nkind: classifier\n  bad: [\n" if case == "garbage-yaml" else preset.replace("image_size: 8", "image_size: eight")
        (tmp_path / "p.yaml").write_text(text)
        args[1] = str(tmp_path / "p.yaml")
    elif case == "one-class-folder":
        args = ["--model", "cnn-digits", "--random-fraction", "0.2", "--data", str(one_class_folder(tmp_path / "d"))]
    else:
        args += ["--data", str(one_class_folder(tmp_path / "d", broken="a"))]
    assert guarded(forget_main, [*args, "--output-dir", str(tmp_path / "run")]) == 2
    assert message in one_error_line(capsys)


def test_a_resume_may_change_the_learning_rate_and_steps_but_not_the_method(cnn_task, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    common = ["--model", "cnn-digits", "--class", "3", "--checkpoint-every", "10", "--output-dir", str(out)]
    real_step = random_label.random_label_step
    monkeypatch.setattr(random_label, "random_label_step", interrupted_at(real_step, 25))
    assert guarded(forget_main, [*common, "--method", "random_label", "--steps", "40", "--lr", "0.01"]) == 130
    monkeypatch.setattr(random_label, "random_label_step", real_step)
    capsys.readouterr()
    assert guarded(forget_main, [*common, "--method", "finetune", "--steps", "40", "--resume_from_checkpoint", "latest"]) == 2
    assert "differs in method" in one_error_line(capsys)
    assert guarded(forget_main, [*common, "--method", "random_label", "--steps", "15", "--lr", "0.005",
                                 "--resume_from_checkpoint", "latest"]) == 2
    assert "the checkpoint is at step 20; resume with more than 20 steps" in one_error_line(capsys)
    assert guarded(forget_main, [*common, "--method", "random_label", "--steps", "50", "--lr", "0.005",
                                 "--resume_from_checkpoint", "latest"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_with"] == {"lr": [0.01, 0.005], "steps": [40, 50]} and report["steps"] == 50
    assert [entry["lr"] for entry in report["log"] if entry["step"] > 20] == [0.005] * 3
    assert json.loads((out / "run.json").read_text())["settings"]["lr"] == 0.005


def worker_pids(launcher: int) -> list[int]:
    """The processes ``accelerate launch`` (pid ``launcher``) started, through any agent in between."""
    children = [int(pid) for task in Path(f"/proc/{launcher}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    return [pid for child in children for pid in [child, *worker_pids(child)]]


def test_one_of_two_processes_killed_leaves_no_outputs_and_the_run_resumes_to_the_same_weights(cnn_task, cache_dir, tmp_path):
    """An uninterrupted 2-process run, one killed with SIGKILL mid-run, and its resume (about 80 s on 2 cores)."""
    script = REPO / "scripts" / "forget_class.py"
    common = ["--model", "cnn-digits", "--class", "3", "--method", "random_label", "--steps", "120", "--checkpoint-every", "20"]
    straight = accelerate_launch(script, [*common, "--output-dir", str(tmp_path / "straight")], cache_dir, port=29541)
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "killed"
    env = {**os.environ, "GENUNLEARN_CACHE": str(cache_dir)}
    victim = subprocess.Popen(accelerate_command(script, [*common, "--output-dir", str(out)], port=29543), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (out / "checkpoints" / "checkpoint-20").is_dir() or victim.poll() is not None, timeout_s=300)
    workers = worker_pids(victim.pid)
    assert victim.poll() is None and workers
    os.kill(workers[-1], signal.SIGKILL)
    victim.wait(timeout=120)
    assert victim.returncode != 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "run.json", "run.log"]  # no report, model or staging
    resumed = accelerate_launch(script, [*common, "--output-dir", str(out), "--resume_from_checkpoint", "latest"], cache_dir,
                                port=29545)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_with_its_output_in_files_writes_plain_lines_and_a_run_log(cnn_task, cache_dir, tmp_path):
    out = tmp_path / "run"
    with open(tmp_path / "stdout.txt", "w") as stdout, open(tmp_path / "stderr.txt", "w") as stderr:
        console_script = Path(sys.executable).with_name("genunlearn")  # imports tqdm before any setting of ours
        done = subprocess.run([str(console_script), "forget", "--model", "cnn-digits", "--class", "3", "--steps", "20",
                               "--log-every", "10", "--output-dir", str(out)], stdout=stdout, stderr=stderr,
                              env={**{k: v for k, v in os.environ.items() if not k.startswith("TQDM_")},
                                   "GENUNLEARN_CACHE": str(cache_dir)})
    assert done.returncode == 0
    printed = exact_text(tmp_path / "stdout.txt", tmp_path / "stderr.txt")
    assert "\r" not in printed and "\x1b" not in printed
    assert "unlearning: step 20/20" in printed  # progress as lines instead of bars
    log = (out / "run.log").read_text()
    assert "command: " in log and '"method": "sfron"' in log and "unlearning: step 10/20" in log
    assert "finished: sfron on cnn-digits: forget_acc" in log.rstrip().splitlines()[-1]
    assert "command: " not in printed  # the run's own record stays in run.log
    mask_time = re.search(r"- mask_time_s: (\S+)", (out / "report.md").read_text()).group(1)
    assert len(mask_time.replace(".", "").lstrip("0")) <= 4  # rounded to 4 significant digits in report.md


# Issue 32: one test per row of the fault probe.


def test_row1_the_dataset_fingerprint_covers_classes_labels_grouping_and_transform(tmp_path):
    root = export_digits_folder(tmp_path / "data", per_class=2)
    transform = default_transform(8, 1)

    def fingerprint(size: int = 8) -> str:
        return ImageFolderDataset(root, "train", default_transform(size, 1), tmp_path / "cache").fingerprint()

    plain = fingerprint()
    (root / "superclasses.json").write_text(json.dumps({"low": [f"digit{c}" for c in range(5)],
                                                        "high": [f"digit{c}" for c in range(5, 10)]}))
    grouped = fingerprint()
    (root / "superclasses.json").unlink()
    (root / "classes.txt").write_text("\n".join(f"digit{c}" for c in reversed(range(10))))
    reordered = fingerprint()
    assert len({plain, grouped, reordered, fingerprint(16)}) == 4  # labels, grouping, order and transform all count
    (root / "classes.txt").unlink()
    assert fingerprint() == plain
    (root / "train" / "digit9x").mkdir()  # an added class with no images is refused, not a silent 11th class
    with pytest.raises(UserError, match="digit9x holds no images"):
        ImageFolderDataset(root, "train", transform)


def test_row2_a_run_is_named_by_content_and_its_lock_by_the_resolved_folder(tmp_path):
    from genunlearn.runs.job import ForgetJob, check_output_dir

    target, link = tmp_path / "run", tmp_path / "link"
    target.mkdir()
    link.symlink_to(target)
    assert lock_path(link) == lock_path(target)  # a link to a held folder meets the same lock
    data = export_digits_folder(tmp_path / "data", per_class=2)
    job = ForgetJob(model="cnn-digits", method="sfron", output_dir=target, classes=[3], data=str(data),
                    cache_dir=str(tmp_path / "cache"), resume=True)
    (target / "run.json").write_text(json.dumps(job.run_record()))
    (target / "checkpoints").mkdir()
    assert json.loads((target / "run.json").read_text())["output_path"] == str(target.resolve())
    assert check_output_dir(job) == {}  # the same data: resumable
    zero, one = data / "train" / "digit0" / "000.png", data / "train" / "digit1" / "000.png"
    swap = tmp_path / "swap.png"
    zero.rename(swap)
    one.rename(zero)
    swap.rename(one)  # the folders' images swapped, the paths unchanged
    with pytest.raises(UserError, match=r"holds a different run \(differs in data_content\)"):
        check_output_dir(job)


def test_row3_non_finite_buffers_stop_the_run_and_are_never_resumed_or_published(tmp_path, capsys):
    from genunlearn.engine.checkpoint import load_latest_checkpoint, save_checkpoint
    from genunlearn.engine.loop import LoopConfig, check_finite
    from genunlearn.runs.forget import check_publishable

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoints = tmp_path / "checkpoints"
    save_checkpoint(checkpoints, 10, model, optimizer, {"log": []})
    model[1].running_var.fill_(float("inf"))
    with pytest.raises(UserError, match=r"non-finite by step 20 \(1.running_var\); resume from .*checkpoint-10"):
        check_finite(model, 20, LoopConfig(), checkpoints)
    with pytest.raises(UserError, match="nothing was published"):
        check_publishable(model, "grad_ascent")
    save_checkpoint(checkpoints, 21, model, optimizer, {"log": []})  # as written before buffers were checked
    configure = gu.progress.configure_console
    configure()
    state, _, loop_state = load_latest_checkpoint(checkpoints)
    assert loop_state["step"] == 10 and torch.isfinite(state["1.running_var"]).all()
    assert "checkpoint-21 holds non-finite values in 1.running_var; resuming from the one before it" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("empty-class", "train/b holds no images"),
    ("listing-names-a-missing-folder", "names 'c', which is not a folder under"),
    ("listing-names-a-path", "names '../../x', which is not a folder name inside"),
    ("self-link", "train/self holds no images"),
    ("folder-named-like-an-image", "x.png is a folder, not an image"),
    ("dangling-link", "gone.png is a broken or looping link, not an image"),
    ("link-loop", "loop.png is a broken or looping link, not an image"),
    ("grouping-bad-json", "superclasses.json is not valid JSON (line 1)"),
    ("grouping-a-list", "superclasses.json must map super-class names to non-empty lists"),
])
def test_row4_bad_image_folders_are_one_error_line_before_any_work(case, message, tmp_path, capsys):
    root = one_class_folder(tmp_path / "d", broken="a")
    Image.new("L", (8, 8), 7).save(root / "train" / "a" / "0.png")  # both classes readable
    train = root / "train"
    if case == "empty-class":
        for f in (train / "b").iterdir():
            f.unlink()
    elif case == "listing-names-a-missing-folder":
        (root / "classes.txt").write_text("a\nb\nc\n")
    elif case == "listing-names-a-path":
        (root / "classes.txt").write_text("a\n../../x\n")
        (tmp_path / "x").mkdir()
    elif case == "self-link":
        (train / "self").symlink_to(train)
        (root / "test" / "self").mkdir()
    elif case == "folder-named-like-an-image":
        (train / "a" / "x.png").mkdir()
    elif case == "dangling-link":
        (train / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    elif case == "link-loop":
        (train / "a" / "loop.png").symlink_to(train / "a" / "loop.png")
    elif case == "grouping-bad-json":
        (root / "superclasses.json").write_text("{not json")
    else:
        (root / "superclasses.json").write_text('["a", "b"]')
    out = tmp_path / "run"
    args = ["--model", "cnn-digits", "--class", "0", "--data", str(root), "--output-dir", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    assert guarded(forget_main, args) == 2
    assert message in one_error_line(capsys)
    assert not out.exists() and not (tmp_path / "cache" / "models").exists()  # checked before any pretraining


def test_row4_a_label_whose_folder_is_another_number_is_named_with_its_folder():
    from genunlearn.eval.model_card import forgotten_part

    report = {"kind": "classifier", "class": 1,
              "split": {"kind": "class", "classes": [1], "class_names": ["3"]}}
    assert forgotten_part(report) == "class 1 ('3')"
    report["split"]["class_names"] = ["1"]
    assert forgotten_part(report) == "class 1"


def test_row5_a_full_disk_is_one_error_line_and_is_estimated_before_the_loop(cnn_task, tmp_path, monkeypatch, capsys):
    import errno as errno_codes

    from genunlearn.engine import checkpoint

    args = ["--model", "cnn-digits", "--class", "3", "--steps", "2", "--checkpoint-every", "1"]
    real_usage = shutil.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1024))
    assert guarded(forget_main, [*args, "--output-dir", str(tmp_path / "estimated")]) == 2
    assert "checkpoints and the model need about" in one_error_line(capsys)
    monkeypatch.undo()

    def full(*_args, **_kwargs):
        raise OSError(errno_codes.ENOSPC, "No space left on device", str(tmp_path / "full" / "checkpoints"))

    monkeypatch.setattr(checkpoint, "save_file", full)
    assert guarded(forget_main, [*args, "--output-dir", str(tmp_path / "full")]) == 2
    line = one_error_line(capsys)
    assert "cannot write" in line and "No space left on device" in line and str(tmp_path / "full") in line
    monkeypatch.undo()

    def read_only(filename, *_args, **_kwargs):
        raise PermissionError(errno_codes.EACCES, "Permission denied", str(filename))

    monkeypatch.setattr(logging, "FileHandler", read_only)  # an existing folder this user may not write
    (tmp_path / "locked").mkdir()
    assert guarded(forget_main, [*args, "--output-dir", str(tmp_path / "locked")]) == 2
    assert "cannot write " + str(tmp_path / "locked" / "run.log") + " (Permission denied)" in one_error_line(capsys)


def test_row6_a_finished_run_is_marked_by_its_last_write_and_leftovers_are_cleared(cnn_task, tmp_path, monkeypatch):
    from genunlearn.eval import report as report_module
    from genunlearn.runs.forget import run_seeds
    from genunlearn.runs.job import ForgetJob

    written = []
    real_write = report_module.atomic_write_text
    monkeypatch.setattr(report_module, "atomic_write_text", lambda path, text: written.append(path.name) or real_write(path, text))
    job = ForgetJob(model="cnn-digits", method="random_label", output_dir=tmp_path / "series", classes=[3],
                    settings={"steps": 2})
    run_seeds(job, [0])
    assert written[-1] == "report.json" and {"README.md", "report.md"} <= set(written)  # report.json marks it finished
    seed0 = tmp_path / "series" / "seed-0"
    (seed0 / "checkpoints" / "checkpoint-1").mkdir(parents=True)  # a kill after the last write, before the clean-up
    run_seeds(job, [0])
    assert not (seed0 / "checkpoints").exists()


def test_row7_compare_and_sweep_overwrite_nothing_and_check_every_cell_first(cnn_task, tmp_path, monkeypatch, capsys):
    from genunlearn.cli import sweep_main
    from genunlearn.runs import sweep as sweep_module

    run = tmp_path / "run"
    assert guarded(forget_main, ["--model", "cnn-digits", "--class", "3", "--steps", "2", "--output-dir", str(run)]) == 0
    capsys.readouterr()
    (tmp_path / "notes.md").write_text("mine")
    assert guarded(compare_main, [str(run), "--output", str(tmp_path / "notes")]) == 2
    assert "notes.md exists and would be replaced" in one_error_line(capsys)
    assert (tmp_path / "notes.md").read_text() == "mine"
    ran = []
    monkeypatch.setattr(sweep_module, "run_seeds", lambda *a, **k: ran.append(a))
    base = ["--model", "cnn-digits", "--class", "3", "--method", "random_label"]
    for cells, message in ((["lr=1e-3,abc"], "setting lr takes a number, got 'abc'"),
                           (["steps=3,0"], "steps must be at least 1, got 0")):
        assert guarded(sweep_main, [*base, "--set", *cells, "--output-dir", str(tmp_path / "sweep")]) == 2
        assert message in one_error_line(capsys) and ran == []  # no cell ran before the bad one was found
    before = sorted(p.name for p in run.iterdir())
    assert guarded(sweep_main, [*base, "--set", "lr=0.1,0.2", "--output-dir", str(run)]) == 2
    assert "holds a forget run, not this sweep" in one_error_line(capsys)
    assert sorted(p.name for p in run.iterdir()) == before
    other = tmp_path / "other-sweep"
    other.mkdir()
    (other / sweep_module.SWEEP_FILE).write_text(json.dumps({"sweep": {}, "axes": [], "seeds": [0]}))
    assert guarded(sweep_main, [*base, "--set", "lr=0.1,0.2", "--output-dir", str(other)]) == 2
    assert "holds another sweep" in one_error_line(capsys)


@pytest.mark.parametrize("case, message", [
    ("a-list-line", "entry 1 needs a file_name and a text"),
    ("not-utf8-jsonl", "metadata.jsonl is not UTF-8 text"),
    ("not-utf8-csv", "metadata.csv is not UTF-8 text"),
    ("outside", "which is outside"),
    ("ssd", "ssd applies to classifier models; sd-digits is a text-to-image model"),
])
def test_row8_text_to_image_inputs_are_one_error_line_before_any_work(case, message, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (8, 8), 9).save(folder / "0.png")
    metadata = {"a-list-line": ("metadata.jsonl", b"[1, 2]\n"),
                "not-utf8-jsonl": ("metadata.jsonl", b'{"file_name": "0.png", "text": "caf\xe9"}\n'),
                "not-utf8-csv": ("metadata.csv", b"file_name,text\n0.png,caf\xe9\n"),
                "outside": ("metadata.jsonl", b'{"file_name": "../../../../etc/hostname", "text": "a handwritten digit three"}\n'),
                "ssd": ("metadata.jsonl", b'{"file_name": "0.png", "text": "a handwritten digit three"}\n')}[case]
    (folder / metadata[0]).write_bytes(metadata[1])
    args = ["--model", "sd-digits", "--concept", "a handwritten digit three", "--output-dir", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache")]
    args += ["--method", "ssd"] if case == "ssd" else ["--data", str(folder)]
    assert guarded(forget_main, args) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache" / "models").exists()


@pytest.mark.parametrize("flag", ["--eval-steps", "--remain-classes", "--eval-samples"])
def test_row9_a_zero_count_is_refused_not_read_as_the_default(flag, tmp_path, capsys):
    args = ["--model", "ddpm-digits", "--class", "3", flag, "0", "--output-dir", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache")]
    assert guarded(forget_main, args) == 2
    assert f"{flag} must be at least 1, got 0" in one_error_line(capsys)
    assert not (tmp_path / "cache" / "models").exists()


def test_row10_library_arguments_get_type_errors_and_a_custom_pipeline_index_is_refused(cnn_task, class3_split, tmp_path):
    from genunlearn.storage.pipeline_folder import load_pipeline

    with pytest.raises(TypeError, match=r"task must be a genunlearn Task, got str \(load it first"):
        gu.unlearn("cnn-digits", class3_split)
    with pytest.raises(TypeError, match="split must be a ForgetSplit"):
        gu.unlearn(cnn_task, None)
    with pytest.raises(TypeError, match="classes must be a list of class ids or names"):
        gu.forget_split(cnn_task, classes=[3.7])
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": ["pipeline", "MyPipeline"]}))
    with pytest.raises(UserError, match="names a custom pipeline .* whose code genunlearn does not run"):
        load_pipeline(tmp_path / "pipe")


def test_row11_writes_stay_in_their_place(tmp_path, monkeypatch):
    from genunlearn.cli import forget_parser, job_from_args

    preset = (REPO / "genunlearn" / "configs" / "models" / "cnn-digits.yaml").read_text()
    escaped = tmp_path / "escaped.yaml"
    escaped.write_text(preset.replace("name: cnn-digits", "name: ../../escaped"))
    with pytest.raises(UserError, match="name '../../escaped' must be letters"):
        gu.models.presets.get_preset(str(escaped))
    mine = tmp_path / "elsewhere" / "my.yaml"
    job = job_from_args(forget_parser().parse_args(["--model", str(mine), "--class", "3"]), {})
    assert job.output_dir == Path("outputs") / "my-3-sfron"  # under outputs/, not beside the YAML
    default, chosen = tmp_path / "default-cache", tmp_path / "chosen-cache"
    monkeypatch.setenv("GENUNLEARN_CACHE", str(default))
    root = export_digits_folder(tmp_path / "data", per_class=1)
    ImageFolderDataset(root, "train", default_transform(8, 1), chosen).fingerprint()
    assert (chosen / "file_hashes.json").is_file() and not default.exists()


def test_row12_the_model_card_leads_with_the_load_that_runs_no_code():
    from genunlearn.eval.model_card import diffusion_loading

    card = diffusion_loading("ClassConditionalPipeline", "UNet2DModel", "ab" * 32)
    assert card.index('UNet2DModel.from_pretrained("RUN/pipeline", subfolder="denoiser")') < card.index("trust_remote_code")
    assert f"SHA-256 `{'ab' * 32}`" in card and "running no code" in card
