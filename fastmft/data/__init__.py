"""The data layer: input sources, the row schema and its checks, tokenising and batching, and the
synthetic demo corpus. Its public names are re-exported here."""

from .batching import MODEL_INPUTS, Collator, LengthBucketSampler, PreparedData, prepare, stream_seed, tokenize
from .schema import Columns, Vocab, check_columns, encode_labels
from .sources import load_table

__all__ = [
    "MODEL_INPUTS",
    "Collator",
    "Columns",
    "LengthBucketSampler",
    "PreparedData",
    "Vocab",
    "check_columns",
    "encode_labels",
    "load_table",
    "prepare",
    "stream_seed",
    "tokenize",
]
