"""cached-ds: exact CachED training of Hugging Face encoder–decoders on whole long documents."""

from .cached_encoder import CachedEncoderFunction, encode_windows
from .config import CachedConfig
from .memory import SavedTensorMeter
from .model import CachedSeq2Seq
from .windows import WindowPlan

__all__ = ["CachedConfig", "CachedEncoderFunction", "CachedSeq2Seq", "SavedTensorMeter", "WindowPlan", "encode_windows"]
__version__ = "0.1.0"
