"""Worker for test_text_to_image: SalUn's and SFR-on's masks (and SFR-on's Fishers) of a text-to-image pipeline folder on
the captioned digits, erasing "a handwritten digit three", global batch 8 whatever the process count."""

import sys

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

from genunlearn import SplitSpec, make_forget_split
from genunlearn.data.captioned_digits import CAPTIONS, captioned_digits_split
from genunlearn.distributed import make_accelerator
from genunlearn.engine.saliency import accumulate_gradients
from genunlearn.methods.registry import method_config
from genunlearn.methods.salun import salun_mask
from genunlearn.methods.sfron import sfron_mask
from genunlearn.models.presets import get_preset
from genunlearn.tasks.text_to_image import TextToImageTask

pipeline_dir, out = sys.argv[1], sys.argv[2]
accelerator = make_accelerator()
pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True)
preset = get_preset("sd-digits")
train, test = captioned_digits_split(seed=0)
task = TextToImageTask(preset, pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                       DDPMScheduler.from_config(pipe.scheduler.config), train, test)
split = make_forget_split(train, test, SplitSpec("class", classes=(CAPTIONS.index("a handwritten digit three"),)))
per_process = {"batch_size": 8 // accelerator.num_processes}
_, sfron_cfg = method_config("sfron", preset, {**per_process, "fisher_batches": 4})
_, salun_cfg = method_config("salun", preset, per_process)
tensors = {}
for method, (mask, _) in (("sfron", sfron_mask(task, split, sfron_cfg, accelerator)),
                          ("salun", salun_mask(task, split, salun_cfg, accelerator))):
    tensors.update({f"{method}.{n}": k.to(torch.uint8).cpu() for n, k in zip(mask.names, mask.keep)})
fisher = accumulate_gradients(task.model, task.importance_loss, split.forget, accelerator, batch_size=8)
tensors.update({f"fisher.{n}": f.cpu().contiguous() for (n, _), f in zip(task.model.named_parameters(), fisher)})
if accelerator.is_main_process:
    save_file(tensors, out)
