"""The Serve application: models (serve_app.model), deployments, the JSON API, the gallery store."""

from pathlib import Path

#: The Serve config this package ships (`serve deploy` takes it as is; `make run` deploys its application).
#: Importing this package imports nothing else, so entry points can name the file before Ray is loaded.
SHIPPED_CONFIG = Path(__file__).with_name("config.yaml")
