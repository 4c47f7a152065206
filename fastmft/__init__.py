"""fastmft: fast, tested Meta Fine-Tuning of BERT-style encoders across domains.

Public API (DESIGN.md): the functional ops, prototypes and typicality, the MFT loss module, the
functional inner step, and backend selection. Data, backbone and scoring helpers live in their
submodules (fastmft.data, fastmft.backbone, fastmft.scoring).
"""
from . import kernels
from .backend import current_backend, use_backend
from .functional import masked_mean_pool, multi_head_cross_entropy, shuffle_domains, typicality
from .inner_step import FlatParams, NonFiniteError, inner_step
from .nn import MaskedMeanPool, MFTLoss, MFTLossOutput, MultiHeadCrossEntropyLoss, skip_layers
from .prototypes import MultiPrototypes, PrototypeAccumulator, Prototypes, class_prototypes, multi_prototypes

__version__ = "0.1.0"

__all__ = [
    "FlatParams",
    "MFTLoss",
    "MaskedMeanPool",
    "MultiHeadCrossEntropyLoss",
    "MFTLossOutput",
    "MultiPrototypes",
    "NonFiniteError",
    "PrototypeAccumulator",
    "Prototypes",
    "class_prototypes",
    "current_backend",
    "inner_step",
    "kernels",
    "masked_mean_pool",
    "multi_head_cross_entropy",
    "multi_prototypes",
    "shuffle_domains",
    "skip_layers",
    "typicality",
    "use_backend",
]
