"""Queue, task store and blob store backends, chosen by URL (see ``registry``)."""
