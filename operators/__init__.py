"""Operators of radfusion's MONAI Deploy apps: one concern each, nothing of the network."""

from radfusion.runtime import prepare_holoscan

prepare_holoscan()
