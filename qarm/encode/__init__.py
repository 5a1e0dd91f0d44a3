"""Content encoders: item text (all-MiniLM-L6-v2) fused with the dataset's modality vectors.

Modules
-------
``text``     item text of a dataset, the packaged MiniLM, batched text embeddings
``content``  :class:`ContentEncoder` (text model + per-modality projection + fusion), ``encode_items``
``cache``    on-disk cache of encoded vectors (safetensors + JSON, atomic, never unpickled)
``image``    image embeddings from a local transformers vision model folder (no hub access)
"""

from qarm.encode.cache import VectorCache
from qarm.encode.content import ContentEncoder, ContentEncoderConfig, ItemInputs, encode_items
from qarm.encode.text import encode_texts, item_texts, load_text_model

__all__ = [
    "ContentEncoder",
    "ContentEncoderConfig",
    "ItemInputs",
    "VectorCache",
    "encode_items",
    "encode_texts",
    "item_texts",
    "load_text_model",
]
