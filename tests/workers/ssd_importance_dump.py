"""Worker for test_ssd: SSD and LF-SSD importances of cnn-digits (class 3 forgotten), uncached, from however many
processes launched it."""

import sys

from safetensors.torch import save_file

from genunlearn import SplitSpec, load_task, make_forget_split
from genunlearn.distributed import make_accelerator
from genunlearn.methods.ssd import SSDConfig, ssd_importances

accelerator = make_accelerator()
task = load_task("cnn-digits", accelerator=accelerator)
task.cache_dir = None  # computed here, not read from the cache the single process may have filled
split = make_forget_split(task.train_data, task.test_data, SplitSpec("class", classes=(3,)))
tensors = {}
for label_free in (False, True):
    whole, forget, _ = ssd_importances(task, task.model.to(accelerator.device), split, SSDConfig(batch_size=48), accelerator, label_free)
    for (name, _), w, f in zip(task.model.named_parameters(), whole, forget):
        tensors[f"{label_free}/D/{name}"], tensors[f"{label_free}/f/{name}"] = w.contiguous(), f.contiguous()
if accelerator.is_main_process:
    save_file(tensors, sys.argv[1])
