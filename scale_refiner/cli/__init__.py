"""The commands, one module each; ``launch/<name>.py`` are thin shims that keep the README's paths working, and
``scale-refiner <command>`` (``cli/main.py``, a console script) runs the user-facing ones."""
