"""The MFT trainer: Meta Fine-Tuning as the paper runs it (docs/design.md section 2, Algorithm 1), with
the paper's baselines and ablations under one interface.

Procedure of the MFT methods (``dc``, ``tw``, ``full``):

1. typicality pass with the PRE-TRAINED encoder (prototypes, then one score per training row,
   stored with the data as the column ``typicality`` and in ``<output_dir>/typicality.safetensors``);
2. MFT epochs over all domains with L = L_TLC + lambda * L_SDC (:class:`fastmft.MFTLoss`: label
   head on [CLS], one domain head per skip layer, domain embedding, domain labels shuffled per
   global batch);
3. the added heads are dropped: the meta-learner is the bare encoder again;
4. per domain, a copy of the meta-learner with a fresh classifier is fine-tuned on that domain alone;
5. per-domain evaluation: accuracy and macro-F1.

Methods: ``s`` BERT(S) (step 4 from the pre-trained encoder), ``mix`` BERT(Mix) (one model on the
pooled domains), ``mtl`` BERT(MTL) (shared encoder, one classifier per domain), ``adv`` BERT(Adv)
(pooled, plus a domain classifier behind gradient reversal), ``dc`` MFT(DC) (t = 1), ``tw``
MFT(TW) (lambda = 0), ``full`` MFT(Full).

Training: AdamW, linear warmup then linear decay per phase, gradient clipping, bf16 autocast on
CUDA, length-bucketed batches, tqdm, metrics as JSON lines, checkpoints (model in safetensors,
optimizer and scheduler through torch.save / torch.load(weights_only=True)) that resume to the
same result as an uninterrupted run, and torch.distributed (torchrun): every rank takes its slice
of the same global batch and the loss is rescaled so that the averaged gradient is exactly the
single-process one.

Modules: ``config`` (methods, :class:`TrainConfig`, :class:`TrainResult`), ``inputs``
(:func:`load_data`), ``models`` (the classifiers around the encoder), ``checkpoint`` (the run
folder), ``loop`` (phases, epochs, steps), ``metrics`` (scores and the comparison table).

Python API (``api``, re-exported here and loaded on first use): :func:`train` (one method), :func:`compare` (several methods on the same data),
:func:`meta_train` (steps 1-3 alone, returns the meta-learned encoder). CLI: ``fastmft train``
(fastmft/cli/train.py), also ``python -m fastmft train`` (e.g. under torchrun).
"""

from fastmft._lazy import lazy_exports

# defining module (relative to this package) -> the public names it exports
_EXPORTS = {
    ".config": "JOINT_METHODS METHODS METHOD_NAMES MFT_METHODS TrainConfig TrainResult method_key",
    ".inputs": "TrainData load_data",
    ".metrics": "format_table",
    ".api": "compare meta_train train",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
