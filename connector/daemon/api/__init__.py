"""The connector's own HTTPS API and web console.

- `server.py`: the HTTPS server (uvicorn, TLS 1.2+ only) in a background thread;
- `web.py`: the application: the token gate, JSON errors, the OpenAPI schema, the
  console's static files;
- `routes.py`: the endpoints, one router per resource, over `ApiServices`;
- `models.py`: the request and response bodies the schema describes;
- `metrics.py`: the metrics read from the state at scrape time;
- `console/`: the web console (static HTML, CSS and JavaScript, no build step).

See docs/api.md.
"""

from connector.daemon.api.routes import ApiServices
from connector.daemon.api.server import MIN_TOKEN_LENGTH, ApiServer, probe_health

__all__ = ["MIN_TOKEN_LENGTH", "ApiServer", "ApiServices", "probe_health"]
