"""HTTP routes: the OpenAI-compatible API, health, and (later) the admin API."""
