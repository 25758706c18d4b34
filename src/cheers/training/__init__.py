"""Training Cheers: recipes for the paper's four stages (plus a stage 0 for the ShapesWorld VAE).

Files map onto the pipeline:

* ``config.py`` (recipes, strict YAML, ``--set`` overrides), ``stages.py`` (the paper's stage table),
  ``recipes/*.yaml`` (one per stage, ``tiny-shapes``);
* data: read through :mod:`cheers.data` (``sources``, ``shards``, ``shapes_source``, ``samples``, ``collate``,
  ``loader``), a layer below training;
* engine: ``distributed.py`` (one process, DDP, FSDP2), ``optim.py``, ``loop.py``, ``checkpointing.py``;
* ``parts.py`` (starting points), ``vae_stage0.py``, ``monitor.py``, ``hooks.py`` (the mechanism; the
  ShapesWorld hooks are :mod:`cheers.eval.train_hooks`), ``cli.py`` (``cheers train``: composes the two).

Importing this package imports nothing heavy; use ``cheers.training.loop.train`` to run a recipe.
"""
