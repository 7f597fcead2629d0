"""The worker: receive, claim, generate, store, complete, acknowledge."""
