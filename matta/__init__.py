"""matta: MatTA (Matryoshka Teaching Assistant), one training run, many servable model sizes.

The core (this package) imports numpy only; deep-learning frameworks are
imported lazily by the backend a user picks.
"""

from matta.errors import (
    BackendError,
    FormatError,
    GranularityError,
    InputError,
    InputTypeError,
    MattaError,
    NestingError,
    NonFiniteLossError,
    OptionError,
    SaveError,
    SpecError,
)
from matta.extraction import extract
from matta.losses import LossOptions
from matta.model import Extracted, MatTA, load
from matta.nesting import Granularity, resolve
from matta.specs import MLP, Transformer
from matta import reference

__version__ = "0.1.0"

__all__ = [
    "MatTA",
    "MLP",
    "Transformer",
    "Extracted",
    "load",
    "extract",
    "resolve",
    "Granularity",
    "LossOptions",
    "reference",
    "MattaError",
    "SpecError",
    "GranularityError",
    "NestingError",
    "OptionError",
    "InputError",
    "InputTypeError",
    "BackendError",
    "NonFiniteLossError",
    "FormatError",
    "SaveError",
]
