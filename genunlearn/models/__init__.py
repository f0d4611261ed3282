"""Model presets, architectures and loading."""

from genunlearn.models.presets import ClassifierPreset, TrainRecipe, get_preset, list_presets

__all__ = ["ClassifierPreset", "TrainRecipe", "get_preset", "list_presets"]
