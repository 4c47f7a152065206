"""The data layer: input sources and streaming readers, the row schema and its one row check,
tokenising and batching, and the synthetic demo corpus. Its public names are re-exported here and load on first use."""

from fastmft._lazy import lazy_exports

# defining module (relative to this package) -> the public names it exports
_EXPORTS = {
    ".batching": ("Collator LengthBucketSampler MODEL_INPUTS PreparedData prepare stream_seed tokenize tokenize_texts"),
    ".schema": (
        "CheckedRow Columns DataError Reject Vocab check_columns check_row encode_labels usable_value value_key"
    ),
    ".sources": "SAMPLE_ROWS Source column_names count_rows decode_record iter_records load_table resolve_inputs",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

# Tokens per row after truncation by default: the trainer's, fastmft typicality's and select's (and
# tokenize's); fastmft score's long-review default is its own (ScoreConfig).
MAX_LENGTH = 128
