"""Train a preset from scratch and cache it: `accelerate launch scripts/pretrain.py --model resnet18-digits`."""

import sys

from genunlearn.cli import guarded, pretrain_main

if __name__ == "__main__":
    sys.exit(guarded(pretrain_main))
