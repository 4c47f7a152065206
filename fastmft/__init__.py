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

# defining module -> the public names it exports
_EXPORTS = {
    "fastmft.ops.dispatch": "current_backend use_backend",
    "fastmft.ops.functional": "masked_mean_pool multi_head_cross_entropy shuffle_domains typicality",
    "fastmft.ops.inner_step": "FlatParams NonFiniteError inner_step",
    "fastmft.ops.nn": "MFTLoss MFTLossOutput MaskedMeanPool MultiHeadCrossEntropyLoss skip_layers",
    "fastmft.ops.prototypes": "MultiPrototypes PrototypeAccumulator Prototypes class_prototypes multi_prototypes",
    "fastmft.pipelines.trainer": "TrainConfig compare train",
    "fastmft.pipelines.typicality": "ScoreConfig score_files",
    "fastmft.pipelines.selection": "TaskSelector TaskUtilityScorer",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, submodules=("kernels",))
