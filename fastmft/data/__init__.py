"""The data layer: input sources and streaming readers, the row schema and its one row check,
tokenising and batching, and the synthetic demo corpus. Its public names are re-exported here and load on first use."""

from fastmft._lazy import lazy_exports

# public name -> the module of this package that defines it
_EXPORTS = {
    "Collator": ".batching",
    "LengthBucketSampler": ".batching",
    "MODEL_INPUTS": ".batching",
    "PreparedData": ".batching",
    "prepare": ".batching",
    "stream_seed": ".batching",
    "tokenize": ".batching",
    "tokenize_texts": ".batching",
    "CheckedRow": ".schema",
    "Columns": ".schema",
    "DataError": ".schema",
    "Reject": ".schema",
    "Vocab": ".schema",
    "check_columns": ".schema",
    "check_row": ".schema",
    "encode_labels": ".schema",
    "usable_value": ".schema",
    "value_key": ".schema",
    "SAMPLE_ROWS": ".sources",
    "Source": ".sources",
    "column_names": ".sources",
    "count_rows": ".sources",
    "decode_record": ".sources",
    "iter_records": ".sources",
    "load_table": ".sources",
    "resolve_inputs": ".sources",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
