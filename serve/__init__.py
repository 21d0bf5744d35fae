"""OpenAI-compatible HTTP server (FastAPI) on vLLM's AsyncLLM engine."""
