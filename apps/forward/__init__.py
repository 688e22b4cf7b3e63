"""The ``forward`` app: send the study on, unchanged, to the export destinations."""
