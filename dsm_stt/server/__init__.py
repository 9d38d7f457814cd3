"""asyncio front end: moshi-server-compatible protocol, WebSocket/HTTP routes, auth, metrics."""
