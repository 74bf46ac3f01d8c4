"""The stages: train, evaluate, publish, resume and export. They connect configs, data, training and tracking, and
they are what `pipelines/` calls."""
