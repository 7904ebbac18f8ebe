"""Data: items and errors, a registry of data sets by name, multiple-choice sets, local files, prompt formatting.

Nothing under `taskprune.data` imports `taskprune.evaluate`.
"""

from taskprune.data.core import DataError, Example, MCItem, sample
from taskprune.data.format import CONTENTS, TEMPLATES, format_text
from taskprune.data.registry import DATASETS, load_examples

__all__ = ["CONTENTS", "TEMPLATES", "format_text", "DATASETS", "DataError", "Example", "MCItem", "load_examples",
           "sample"]
