"""fastmft: fast, tested Meta Fine-Tuning of BERT-style encoders across domains.

Public API (docs/design.md): the functional ops, prototypes and typicality, the MFT loss module,
the functional inner step and backend selection (fastmft.ops), and the pipelines on top of them:
training (``train``, ``compare``, ``TrainConfig``), streaming typicality scoring
(``score_files``, ``ScoreConfig``) and task selection (``TaskSelector``, ``TaskUtilityScorer``).
They are imported on first use (PEP 562), so that `import fastmft` and `fastmft --help` do not pay
for torch.
"""

from fastmft._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "current_backend": "fastmft.ops.dispatch",
    "use_backend": "fastmft.ops.dispatch",
    "masked_mean_pool": "fastmft.ops.functional",
    "multi_head_cross_entropy": "fastmft.ops.functional",
    "shuffle_domains": "fastmft.ops.functional",
    "typicality": "fastmft.ops.functional",
    "FlatParams": "fastmft.ops.inner_step",
    "NonFiniteError": "fastmft.ops.inner_step",
    "inner_step": "fastmft.ops.inner_step",
    "MaskedMeanPool": "fastmft.ops.nn",
    "MFTLoss": "fastmft.ops.nn",
    "MFTLossOutput": "fastmft.ops.nn",
    "MultiHeadCrossEntropyLoss": "fastmft.ops.nn",
    "skip_layers": "fastmft.ops.nn",
    "MultiPrototypes": "fastmft.ops.prototypes",
    "PrototypeAccumulator": "fastmft.ops.prototypes",
    "Prototypes": "fastmft.ops.prototypes",
    "class_prototypes": "fastmft.ops.prototypes",
    "multi_prototypes": "fastmft.ops.prototypes",
    "TrainConfig": "fastmft.pipelines.trainer",
    "compare": "fastmft.pipelines.trainer",
    "train": "fastmft.pipelines.trainer",
    "ScoreConfig": "fastmft.pipelines.typicality",
    "score_files": "fastmft.pipelines.typicality",
    "TaskSelector": "fastmft.pipelines.selection",
    "TaskUtilityScorer": "fastmft.pipelines.selection",
}

__all__ = sorted([*_EXPORTS, "kernels"])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, submodules=("kernels",))
