"""OpenAI-compatible HTTP server (vLLM conventions) over the engine: ``create_app(AsyncEngine(...))``.

Layout: ``async_engine`` (the engine on its own thread), ``protocol`` (request/response bodies),
``serving`` (shared handler logic), ``completions``, ``chat``, ``adapters`` (models and LoRA
loading), ``tasks`` (live task addition: submit and status), ``metrics``, ``errors``, ``settings``, ``app``,
``launch`` (uvicorn, used by ``inlaid serve``).
"""
