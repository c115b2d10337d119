"""The request path between HTTP and the engine: tenant + model → weights, prompt ids → text."""
