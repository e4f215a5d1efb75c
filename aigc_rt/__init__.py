"""aigc_rt: a small, fast inference runtime for generative models (GPT-2, DCGAN, VAE, small text models)."""
import torch  # noqa: F401  (loads libtorch before the aigc_rt._C extension)

from .api import embedded_models, load
from .convert import convert
from .errors import FormatError
from .generation import Completion
from .images import save_grid

__all__ = ["load", "convert", "FormatError", "Completion", "embedded_models", "save_grid"]
__version__ = "0.1.0"
