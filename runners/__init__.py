"""Everything both front doors (service.py and runpod_adapter/) share, in layers that import only
downward: api (routes, request types, the front door) → capabilities (the service methods) →
engine (registry, scheduler, batching) → models (loading replicas) → vocabulary, settings, errors.
docs/development.md has the map; runners/api/routes.py is the route table."""
