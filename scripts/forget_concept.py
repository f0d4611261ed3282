"""Erase a concept from a text-to-image model:
`accelerate launch scripts/forget_concept.py --model sd-digits --concept "a handwritten digit three"`."""

import sys

from genunlearn.cli import forget_main, guarded

if __name__ == "__main__":
    sys.exit(guarded(forget_main))
