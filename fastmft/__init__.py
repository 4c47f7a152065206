"""fastmft: fast, tested Meta Fine-Tuning of BERT-style encoders across domains.

Public API (docs/design.md): the functional ops, prototypes and typicality, the MFT loss module,
the functional inner step, and backend selection, all defined in fastmft.ops. They are imported on
first use (PEP 562), so that `import fastmft` and `fastmft --help` do not pay for torch.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module of fastmft.ops that defines it
_EXPORTS = {
    "current_backend": "dispatch",
    "use_backend": "dispatch",
    "masked_mean_pool": "functional",
    "multi_head_cross_entropy": "functional",
    "shuffle_domains": "functional",
    "typicality": "functional",
    "FlatParams": "inner_step",
    "NonFiniteError": "inner_step",
    "inner_step": "inner_step",
    "MaskedMeanPool": "nn",
    "MFTLoss": "nn",
    "MFTLossOutput": "nn",
    "MultiHeadCrossEntropyLoss": "nn",
    "skip_layers": "nn",
    "MultiPrototypes": "prototypes",
    "PrototypeAccumulator": "prototypes",
    "Prototypes": "prototypes",
    "class_prototypes": "prototypes",
    "multi_prototypes": "prototypes",
}

__all__ = sorted([*_EXPORTS, "kernels"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"fastmft.ops.{_EXPORTS[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name == "kernels":
        return importlib.import_module("fastmft.kernels")
    raise AttributeError(f"module 'fastmft' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS, "kernels"])
