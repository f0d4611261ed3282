"""Captioned digits: the embedded text-to-image data. Each 8x8 digit is drawn in one of four styles and captioned
with one of three phrasings, e.g. "a handwritten digit three in bold strokes" or "the number 3 with inverted
colours" (ALGORITHMS_T2I.md §6). Labels index the caption table, so a caption plays the part a class plays
elsewhere (forget splits, per-prompt figures)."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from genunlearn.data.digits import load_digits_split
from genunlearn.data.tensor_dataset import LabeledTensorDataset

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PHRASINGS = ("a handwritten digit {word}", "the number {numeral}", "a {word} written by hand")
STYLES = {"plain": "", "bold": " in bold strokes", "thin": " in thin strokes", "inverted": " with inverted colours"}


def caption(digit: int, phrasing: int = 0, style: str = "plain") -> str:
    """The caption of ``digit`` in phrasing ``phrasing`` (an index into ``PHRASINGS``) and ``style``."""
    return PHRASINGS[phrasing].format(word=DIGIT_WORDS[digit], numeral=digit) + STYLES[style]


CAPTIONS = tuple(caption(d, p, s) for d in range(10) for p in range(len(PHRASINGS)) for s in STYLES)
VOCABULARY = tuple(sorted({word for text in CAPTIONS for word in text.split()}))


def caption_parts(prompt: str) -> tuple[int, str]:
    """``(digit, style)`` of the caption ``prompt`` (one of ``CAPTIONS``)."""
    index = CAPTIONS.index(prompt)
    return index // (len(PHRASINGS) * len(STYLES)), list(STYLES)[index % len(STYLES)]


def paraphrases(prompt: str) -> list[str]:
    """The captions that say what ``prompt`` (a caption) says in the other phrasings: same digit, same style."""
    if prompt not in CAPTIONS:
        return []
    digit, style = caption_parts(prompt)
    return [caption(digit, p, style) for p in range(len(PHRASINGS)) if caption(digit, p, style) != prompt]


def caption_images(prompt: str) -> torch.Tensor | None:
    """Real images ``[N, 1, 8, 8]`` in [-1, 1] of what the caption ``prompt`` shows: every embedded digit (train and
    test) of its digit, drawn in its style (styles and phrasings are drawn independently of the digit, so these are
    the data's distribution for that caption); None when ``prompt`` is no caption."""
    if prompt not in CAPTIONS:
        return None
    digit, style = caption_parts(prompt)
    images, targets = all_digits()
    return styled(images[targets == digit], style)


@lru_cache(maxsize=1)
def all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Every embedded digit ``[1797, 1, 8, 8]`` in [-1, 1] and its label, read once (callers index, never write)."""
    parts = load_digits_split()
    return torch.cat([part.images for part in parts]), torch.cat([part.targets for part in parts])


def styled(images: torch.Tensor, style: str) -> torch.Tensor:
    """``images`` ``[N, 1, H, W]`` in [-1, 1] drawn in ``style``, on the ink level u = (x + 1) / 2: bold ½(u + maxpool3(u)),
    thin u³·[u > ½], inverted 1 − u."""
    ink = (images + 1) / 2
    if style == "bold":
        ink = (ink + F.max_pool2d(ink, 3, stride=1, padding=1)) / 2
    elif style == "thin":
        ink = ink.pow(3) * (ink > 0.5)
    elif style == "inverted":
        ink = 1 - ink
    return ink * 2 - 1


def captioned_digits_split(seed: int = 0) -> tuple[LabeledTensorDataset, LabeledTensorDataset]:
    """The digits' fixed train/test split (1,437 / 360), each image in a style and phrasing drawn with ``seed``;
    labels index ``CAPTIONS`` (the datasets' ``classes``)."""
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for digits in load_digits_split():
        phrasings = torch.randint(0, len(PHRASINGS), (len(digits),), generator=generator)
        styles = torch.randint(0, len(STYLES), (len(digits),), generator=generator)
        images = digits.images.clone()
        for index, style in enumerate(STYLES):
            chosen = styles == index
            images[chosen] = styled(digits.images[chosen], style)
        labels = (digits.targets * len(PHRASINGS) + phrasings) * len(STYLES) + styles
        parts.append(LabeledTensorDataset(images, labels, CAPTIONS))
    return parts[0], parts[1]
