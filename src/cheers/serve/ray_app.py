"""The same server as a Ray Serve deployment: N replicas of the FastAPI app, each with its own engine.

Needs the ``ray`` extra (``pip install 'cheers[ray]'``: a Ray whose ``serve.ingress`` takes an app builder);
ray is imported only here, when called. Each replica builds the app and loads the model in the app's
startup (so replicas start in parallel, each on the GPU Ray gives it) and batches its own requests exactly
as ``cheers serve`` does; Ray's proxy spreads requests over the replicas.

Run it from Python::

    from ray import serve
    from cheers.serve.ray_app import build_app

    serve.run(build_app(model="default", num_replicas=2), route_prefix="/")

or with the Ray CLI (keyword arguments as ``key=value``)::

    serve run cheers.serve.ray_app:app_builder model=default num_replicas=2
"""

from __future__ import annotations

from typing import Any

from cheers.serve.config import ServeConfig


def build_app(
    model: str = "default",
    *,
    config: ServeConfig | None = None,
    device: str = "auto",
    dtype: str | None = None,
    num_replicas: int = 1,
    ray_actor_options: dict[str, Any] | None = None,
) -> Any:
    """A bound Ray Serve application (``serve.run`` it) serving ``model`` from ``num_replicas`` replicas.

    Args:
        model: what :meth:`CheersPipeline.from_pretrained` takes.
        config: limits and batching per replica (default: :class:`ServeConfig` with the model's name).
        device, dtype: where and how each replica loads the model.
        num_replicas: replicas behind Ray's proxy.
        ray_actor_options: per replica, e.g. ``{"num_gpus": 1}``.
    """
    try:
        from ray import serve
    except ImportError as err:
        raise ImportError("the Ray Serve deployment needs ray: pip install 'cheers[ray]'") from err
    from cheers.serve.cli import served_name

    config = config or ServeConfig(model_name=served_name(model))

    # a builder, not an app: each replica builds its own app (and engine) instead of unpickling one. It must
    # be a plain function: Ray tells a builder from an ASGI app with inspect.isfunction (a functools.partial
    # would be called as the app itself, with (scope, receive, send)).
    def builder() -> Any:
        return _asgi_app(model, config, device, dtype)

    @serve.deployment(name="cheers", num_replicas=num_replicas, ray_actor_options=ray_actor_options or {})
    @serve.ingress(builder)
    class CheersDeployment:
        """The app's routes, its startup (model load, engine start) and shutdown run in each replica."""

    return CheersDeployment.bind()


def _asgi_app(model: str, config: ServeConfig, device: str, dtype: str | None) -> Any:
    from cheers.serve.app import create_app, engine_loader

    return create_app(config, load_engine=engine_loader(model, config, device=device, dtype=dtype))


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run cheers.serve.ray_app:app_builder key=value ...`` (model, device, dtype,
    num_replicas, num_gpus, api_key, max_batch)."""
    config = ServeConfig(
        model_name=args.get("served_model_name") or None,
        api_key=args.get("api_key") or None,
        max_batch=int(args.get("max_batch", ServeConfig.max_batch)),
    )
    model = args.get("model", "default")
    if config.model_name is None:
        from cheers.serve.cli import served_name

        config.model_name = served_name(model)
    gpus = float(args.get("num_gpus", 0))
    return build_app(
        model,
        config=config,
        device=args.get("device", "auto"),
        dtype=args.get("dtype"),
        num_replicas=int(args.get("num_replicas", 1)),
        ray_actor_options={"num_gpus": gpus} if gpus else None,
    )
