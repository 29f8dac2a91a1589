"""Who may call the service: API keys with scopes (see :mod:`serve_app.access.keys`)."""
