"""Worker for test_sd_protocols: one generation per protocol row of a saved tiny pipeline, measured on the process that
made it, from however many processes launched it. Saves the gathered images in row order and who made each."""

import sys

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from genunlearn.distributed import make_accelerator
from genunlearn.eval.sd_protocols import PromptRow, measure_rows
from genunlearn.models.prompt_sampling import sampler_like

ROWS = [PromptRow("a handwritten digit one", 11), PromptRow("a handwritten digit two", 12, 1.0),
        PromptRow("a handwritten digit one", 13), PromptRow("the number 4", 14), PromptRow("a seven written by hand", 15)]

accelerator = make_accelerator()
loaded = StableDiffusionPipeline.from_pretrained(sys.argv[1], local_files_only=True)
sampler = sampler_like(loaded)
figures = measure_rows(sampler, ROWS, lambda image, row: {"image": image[0].cpu(), "process": accelerator.process_index},
                       accelerator, steps=3, guidance=3.0, desc="rows")
if accelerator.is_main_process:
    save_file({"images": torch.stack([f["image"] for f in figures]).contiguous(),
               "processes": torch.tensor([f["process"] for f in figures])}, sys.argv[2])
