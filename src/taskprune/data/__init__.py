"""Data: a registry of data sets by name, local files, and prompt formatting."""

from taskprune.data.format import CONTENTS, TEMPLATES, format_text
from taskprune.data.registry import DATASETS, DataError, Example, load_examples, sample

__all__ = ["CONTENTS", "TEMPLATES", "format_text", "DATASETS", "DataError", "Example", "load_examples", "sample"]
