"""HTTP: the OpenAI-compatible API, its request checks and error shape, the admin API and its client."""
