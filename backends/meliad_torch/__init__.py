"""meliad_torch: built-in meliad plugin (being written)."""
