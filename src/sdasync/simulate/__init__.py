"""``sdasync simulate``: replay an arrival trace against scaling policies and compare cost and wait."""
