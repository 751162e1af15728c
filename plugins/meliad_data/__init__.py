"""meliad_data: built-in meliad plugin (being written)."""
