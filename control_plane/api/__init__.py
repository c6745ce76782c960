"""API v1: the FastAPI Cloud contract plus our extensions (docs/API.md). One module per resource."""
