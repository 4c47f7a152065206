"""fastmft inside other libraries' training loops: ``fastmft.integrations.transformers`` for
``transformers.Trainer``. Imported explicitly (``import fastmft`` does not load transformers' Trainer)."""
