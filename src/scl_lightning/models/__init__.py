"""Model registry (``create_model``, ``list_models``, ``register_model``) and architectures.

Importing this package registers every built-in architecture.
"""

from .cnn import SmallCNN
from .mlp import LeNet300100
from .registry import create_model, list_models, register_model

__all__ = ["LeNet300100", "SmallCNN", "create_model", "list_models", "register_model"]
