"""RunPod serverless adapter: the service methods as a `runpod.serverless.start` handler.

`python -m runpod_adapter` runs the worker (see `__main__`); `handler` holds the job handler and
the concurrency modifier, `volume` the network-volume model copies. Nothing heavy is imported
here: the model settings must be decided (volume copies) before `service` is imported.
"""
