"""Placeholder: pytest plugin offering keras_attn component checks (issue 5)."""
