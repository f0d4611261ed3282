"""Faults a run must survive with nothing lost: concurrent runs into one folder, locks left by killed processes,
caches filled by two jobs at once."""

from __future__ import annotations

import copy
import json
import os
import re
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
