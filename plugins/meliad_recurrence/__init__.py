"""meliad_recurrence: built-in meliad plugin (being written)."""
