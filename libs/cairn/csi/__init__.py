"""CSI helpers shared by the controller (cairn-meta) and node (cairn-nodeplugin) plugins."""
