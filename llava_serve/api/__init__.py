"""The API: the OpenAI-compatible protocol (`protocol`), the chat service that turns a request into
backend calls and a response (`chat`, `messages`, `formats`), the HTTP mapping and the door check
(`http`, `auth`, `bounds`, `admission`), health (`health`), request records (`telemetry`) and the
playground page."""
