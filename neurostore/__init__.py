"""neurostore: neuron-level activation statistics of transformers over large corpora.

``neurostore.open(path)`` opens an activation store (or several ``--part`` stores as one); the
extraction, query and intervention functions live in their own modules and import torch only
where a model is run.
"""

from .errors import NeurostoreError
from .store import Store, open

__version__ = "0.1.0"
__all__ = ["NeurostoreError", "Store", "open", "__version__"]
