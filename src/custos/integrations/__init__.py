"""Framework adapters for WIMSE: httpx / requests auth, ASGI / WSGI middleware, problem+json.

The only place in custos where HTTP status codes live.
"""
