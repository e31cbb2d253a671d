"""Block-sparse execution: compute only the score blocks a pattern can reach.

Not implemented yet: `pays_off` always declines, so the engine runs such patterns on
the dense path.
"""


def pays_off(pattern, query_length, key_length, mode="auto"):
    """Whether the block-sparse path should run this pattern at these lengths."""
    if mode is True:
        raise NotImplementedError("The block-sparse path is not implemented yet.")
    return False
