"""SQLite backends: a queue with SQS semantics and a task store, in one file shared by every local process."""
