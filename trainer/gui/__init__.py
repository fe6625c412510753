"""The GUI: `form` (presets, form values <-> TOML, the pre-flight check) and `runner` (a training subprocess
followed through its events file) hold all the logic and import neither gradio nor torch; `app` is the thin
gradio layer on top of them."""
