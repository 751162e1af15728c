"""meliad_memory: built-in meliad plugin (being written)."""
