"""Serving: the front doors and what stands between them and the library.

The line of requests and its runners (local, replicas, torchrun ranks, ZeroGPU, Ray), the upload
door, the web guard, startup (flags to a pipeline), download, the Gradio app and the command
line. :mod:`pulid` below it is the library and never imports this package.
"""
