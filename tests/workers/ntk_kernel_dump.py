"""Worker for test_fast_ntk: primal kernel sums and the Fisher of a tiny BatchNorm CNN on 23 random images, from
however many processes launched it (23 images in chunks of 5: the processes hold uneven counts)."""

import sys

from safetensors.torch import save_file

from genunlearn.distributed import make_accelerator
from genunlearn.engine.ntk import kernel_sums, prediction_fisher
from genunlearn.models.peft import scope_parameters

sys.path.insert(0, sys.argv[2])
from test_fast_ntk import random_split, tiny_bn_cnn  # noqa: E402

accelerator = make_accelerator()
model = tiny_bn_cnn()
params = scope_parameters(model, "batchnorm+head")
data, _ = random_split(23)
gram, pull = kernel_sums(model, params, data, accelerator, "sums", chunk_size=5, path="auto", loss="ce")
fisher = prediction_fisher(model, params, data, accelerator, chunk_size=5, path="auto")
if accelerator.is_main_process:
    save_file({"gram": gram.cpu().contiguous(), "pull": pull.cpu().contiguous(), "fisher": fisher.cpu().contiguous()}, sys.argv[1])
