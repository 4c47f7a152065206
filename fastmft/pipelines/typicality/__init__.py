"""The one typicality pipeline (the MFT paper's first step): embed every row once (masked mean of
the last layer, :mod:`.embed`), build the prototypes of each (domain, label) cell through
:class:`~fastmft.ops.prototypes.PrototypeAccumulator` (or J per cell by k-means) and score each
row (:mod:`.core`), then report the most and least typical rows per domain (:mod:`.report`).

Two ways in, the same steps:

- in memory (:mod:`.memory`): :func:`score_dataset` on a tokenised ``datasets.Dataset``, what the
  trainer's typicality pass and ``fastmft typicality`` call;
- streaming (:mod:`.stream`): :func:`score_files` with a :class:`ScoreConfig`, ``fastmft score``:
  files of any size through an on-disk chunk cache (:mod:`.cache`), resumable after ``kill -9``,
  sharded under torchrun, merged into Parquet (:mod:`.merge`)."""

from fastmft._lazy import lazy_exports

# defining module (relative to this package) -> the public names it exports
_EXPORTS = {
    ".config": "ScoreConfig ScoreError ScoreSummary TypicalityConfig",
    ".memory": "TypicalityScores score_dataset",
    ".stream": "score_files",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
