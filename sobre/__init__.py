"""sobre: an open, frugal, end-to-end DeepSeek-style LLM system."""

from .checkpoint import load, save
from .config import Config, preset
from .engine import Engine, generate
from .model import Transformer, init_weights
from .sampling import SamplingParams
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"
__all__ = ["Config", "Transformer", "Tokenizer", "Engine", "SamplingParams", "load", "save", "preset",
           "init_weights", "generate", "load_tokenizer"]
