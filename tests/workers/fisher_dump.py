"""Worker for test_engine: the cnn-digits Fisher on the class-3 forget set, from however many processes launched it."""

import sys

from safetensors.torch import save_file

from genunlearn import SplitSpec, load_task, make_forget_split
from genunlearn.distributed import make_accelerator
from genunlearn.engine.saliency import accumulate_gradients

accelerator = make_accelerator()
task = load_task("cnn-digits", accelerator=accelerator)
split = make_forget_split(task.train_data, task.test_data, SplitSpec("class", classes=(3,)))
fisher = accumulate_gradients(task.model.to(accelerator.device), task.loss, split.forget, accelerator, batch_size=32)
if accelerator.is_main_process:
    save_file({n: f.contiguous() for (n, _), f in zip(task.model.named_parameters(), fisher)}, sys.argv[1])
