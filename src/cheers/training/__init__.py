"""Training Cheers: recipes for the paper's four stages (plus a stage 0 for the ShapesWorld VAE).

Files map onto the pipeline:

* ``config.py`` (recipes, strict YAML, ``--set`` overrides), ``stages.py`` (the paper's stage table),
  ``recipes/*.yaml`` (one per stage, ``tiny-shapes``);
* data: ``sources.py`` (jsonl + images), ``shards.py`` (tar shards), ``shapes_source.py`` (ShapesWorld),
  ``samples.py`` (record -> ids, labels, images, t, noise), ``collate.py``, ``data.py`` (mixing, positions,
  corrupt samples);
* engine: ``distributed.py`` (one process, DDP, FSDP2), ``optim.py``, ``loop.py``, ``checkpointing.py``;
* ``parts.py`` (starting points), ``vae_stage0.py``, ``monitor.py``, ``hooks.py``, ``cli.py``.

Importing this package imports nothing heavy; use ``cheers.training.loop.train`` to run a recipe.
"""
