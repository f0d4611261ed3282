"""Worker for test_engine: the cnn-digits Fisher on the class-3 forget set (one pass, and 7 cycled batches), from however
many processes launched it."""

import sys

from safetensors.torch import save_file

from genunlearn import SplitSpec, load_task, make_forget_split
from genunlearn.distributed import make_accelerator
from genunlearn.engine.saliency import accumulate_gradients

accelerator = make_accelerator()
task = load_task("cnn-digits", accelerator=accelerator)
split = make_forget_split(task.train_data, task.test_data, SplitSpec("class", classes=(3,)))
model = task.model.to(accelerator.device)
fisher = accumulate_gradients(model, task.loss, split.forget, accelerator, batch_size=32)
cycled = accumulate_gradients(model, task.loss, split.forget, accelerator, batch_size=32, batches=7)
if accelerator.is_main_process:
    names = [n for n, _ in task.model.named_parameters()]
    save_file({**{n: f.contiguous() for n, f in zip(names, fisher)}, **{f"cycled.{n}": f.contiguous() for n, f in zip(names, cycled)}},
              sys.argv[1])
