"""The label convention shared by the data side and the objectives."""

# label of a position whose next token is not predicted (padding, image placeholders, prompts,
# the first token of a packed document); the value torch's cross-entropy ignores by default
IGNORE_INDEX = -100
