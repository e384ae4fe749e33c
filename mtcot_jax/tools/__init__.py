"""Command-line tools that need no accelerator (memory planning)."""
