"""Model classes and loading: the paper's last-token classifier and the embedded default."""

from .classifier import MambaForLastTokenClassification
from .loading import DEFAULT_MODEL_DIR, load_model_and_tokenizer

__all__ = ["DEFAULT_MODEL_DIR", "MambaForLastTokenClassification", "load_model_and_tokenizer"]
