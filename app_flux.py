"""PuLID for FLUX: the Gradio app's entry point, the file a Hugging Face Space runs.

    python app_flux.py                        # FLUX.1-dev + PuLID v0.9.1 on CUDA (downloads or models/)
    python app_flux.py --preset tiny-random   # tiny random weights on CPU: noise, but the whole path runs
    python app_flux.py --help                 # every flag

The app is :mod:`pulid.serve.gradio_app`.
"""

from pulid.serve.gradio_app import run

if __name__ == "__main__":
    run()
