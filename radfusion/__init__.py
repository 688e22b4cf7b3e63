"""radfusion: multimodal AI on the hospital DICOM network."""

__version__ = "0.1.0"
