"""Data: the bundled task (TFDS), benchmark files, the tokenizer and grain batching."""
