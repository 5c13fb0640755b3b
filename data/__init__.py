"""Token data: prepare WebDataset shards from raw text, inspect them, and stream them resumably.

Importing this package stays light (no torch); the loader imports torch itself.
"""
