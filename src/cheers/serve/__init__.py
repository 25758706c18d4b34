"""``cheers serve``: one OpenAI-compatible HTTP server for chat and images from one Cheers model.

The parts, one idea per file:

* ``config.py``: the limits and batching settings (:class:`ServeConfig`), validated once.
* ``schemas.py``: the request and response bodies, mirroring OpenAI's (pydantic).
* ``tasks.py``: what one request asks of the model (image / edit / chat tasks), how compatible tasks are
  grouped, and how a group becomes ONE batched :class:`cheers.pipeline.CheersPipeline` call.
* ``engine.py``: the worker thread that owns the model, the bounded queue in front of it, and futures.
* ``media.py``: data URLs and uploads -> checked PIL images; images -> base64 PNG; ``"WxH"`` sizes.
* ``errors.py``: OpenAI-style error JSON (``{"error": {"message", "type", "param", "code"}}``) for every
  failure, validation errors included.
* ``middleware.py``: bearer auth, the body-size cap and per-endpoint metrics, as plain ASGI middleware.
* ``metrics.py``: the Prometheus collectors of one server.
* ``app.py``: the FastAPI routes over an engine.
* ``cli.py``: the ``cheers serve`` command; ``ray_app.py``: the same app as a Ray Serve deployment.

Nothing here is imported by ``import cheers``; FastAPI and uvicorn come with the ``serve`` extra.
"""
