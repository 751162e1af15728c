"""meliad_tensorflow: built-in meliad plugin (being written)."""
