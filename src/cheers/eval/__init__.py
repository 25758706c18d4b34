"""Evaluation: images for the official GenEval and DPG-Bench scorers, VLMEvalKit understanding, ShapesBench,
plots.

    runner.py        what the image runners share: sharding over RANK/WORLD_SIZE, seeds, atomic PNGs, manifest
    geneval.py       GenEval layout <out>/<i>/{metadata.jsonl, samples/<k>.png} (short and long prompt sets)
    dpg.py           DPG-Bench grids <out>/<name>.png
    prompts.py       the bundled prompt files in data/
    vlmeval.py       CheersVLM, a VLMEvalKit model adapter (``run.py --model Cheers``)
    shapes_bench.py  ShapesGenEval + ShapesVQA + ShapesEdit on ShapesWorld, judged by its scene parser
    report.py        ShapesBench's markdown report
    plots.py         score-vs-step curves (paper Fig. 4) and HFI gate intensity (Fig. 5)
    cli.py           ``cheers eval ...`` and ``cheers plot ...``

Importing this package imports nothing heavy; import the modules you use.
"""
