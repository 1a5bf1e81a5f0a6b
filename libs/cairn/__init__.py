"""Cairn: a cloud-native distributed POSIX file system and Kubernetes storage platform."""

__version__ = "0.1.0"
DRIVER_NAME = "csi.cairn.io"
