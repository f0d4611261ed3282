"""Make a trained model forget a class: `accelerate launch scripts/forget_class.py --model cnn-digits --class 3`."""

import sys

from genunlearn.cli import forget_main, guarded

if __name__ == "__main__":
    sys.exit(guarded(forget_main))
