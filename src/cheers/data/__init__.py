"""Data: the release's jsonl records, the synthetic ShapesWorld, and the training data pipeline.

    records.py        the release's conversation records: parse, validate, read, write
    shapes/           ShapesWorld: world, render, judge, prompts, questions, edits, tokenizer, ladder, export
    sources.py        random-access sources (jsonl + image folder) and the Source interface
    shards.py         WebDataset-style tar shards: write, convert, read
    shapes_source.py  ShapesWorld as a source, and the ShapesWorld processor
    samples.py        record + images -> one training sample (ids, labels, images, t, noise)
    collate.py        samples -> a right-padded batch
    loader.py         sources mixed by ratio, stream positions, corrupt samples, the DataLoader

A layer above the model (core) and below training and evaluation, which both read through it.
"""
