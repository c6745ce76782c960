"""The dashboard's pages, one module per area (as ``control_plane/api`` has one per resource)."""
