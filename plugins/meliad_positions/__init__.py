"""meliad_positions: built-in meliad plugin (being written)."""
