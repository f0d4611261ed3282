"""Tasks: a model plus how to compute its loss on a batch."""

from genunlearn.tasks.base import Batch, ParameterScope, Task
from genunlearn.tasks.classifier import ClassifierTask, build_classifier

__all__ = ["Batch", "ClassifierTask", "ParameterScope", "Task", "build_classifier"]
