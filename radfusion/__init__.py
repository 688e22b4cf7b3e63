"""radfusion: multimodal AI on the hospital DICOM network."""

__version__ = "0.1.0"

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.32862834038813979956915387266700991781"
"""(0002,0012) of every file radfusion writes (derived from pydicom's root, fixed forever)."""

IMPLEMENTATION_VERSION_NAME = "RADFUSION_" + __version__.replace(".", "")
