"""``lung-ct``: lung and lung tumour segmentation of chest CT → DICOM SEG + TID 1500 SR."""

from radfusion.runtime import prepare_holoscan

prepare_holoscan()
