"""Generate images from the command line, without a browser: the entry point of :mod:`pulid.serve.cli`.

    python generate.py --preset tiny-random --id_image example_inputs/astronaut.png \\
        --prompt "portrait, color, cinematic" --seed 1 --seed 2 --out outputs/
    python generate.py --help                 # every flag
"""

from pulid.serve.cli import run

if __name__ == "__main__":
    run()
