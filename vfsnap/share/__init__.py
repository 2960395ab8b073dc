"""Shares: directories of volumes in Cinder's layout, their `.info` files, sidecars and locks."""
