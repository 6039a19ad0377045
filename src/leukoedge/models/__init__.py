"""Registry of Keras architectures by name (imports TensorFlow/Keras).

    from leukoedge.models import create_model, list_models, model_info
    model = create_model("leuko-small", input_size=160, num_classes=4)

Paper nets (``seed-*``) live in :mod:`.paper`, edge-first nets in :mod:`.edge`;
the shared contract (``image`` input with ``Rescaling(1/255)``, ``features``,
float32 ``probabilities``) is enforced by :mod:`.blocks`. An unknown name raises
:class:`~leukoedge.errors.ModelNotFoundError` listing the registered names.
"""
from . import edge, paper  # noqa: F401  (registration side effects)
from .blocks import SigmoidPair
from .macs import count_macs
from .registry import ModelEntry, TrainDefaults, create_model, get_entry, list_models, model_info, register_model

__all__ = ["ModelEntry", "SigmoidPair", "TrainDefaults", "count_macs", "create_model", "get_entry",
           "list_models", "model_info", "register_model"]
