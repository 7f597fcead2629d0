"""Image generation engines, chosen by URL (see ``sdasync.backends.registry``)."""
