"""The web dashboard: server-rendered pages over the control plane's own services (``routes.py`` maps
them; ``docs/DASHBOARD.md`` describes them)."""
