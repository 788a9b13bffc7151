"""HTTP layer: OpenAI wire models, request logic, routes, errors, middleware, metrics."""
