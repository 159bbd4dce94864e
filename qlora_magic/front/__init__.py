"""What the user touches: the IPython magics, their parsers, the widget panel, and the prompt-line fix for
IPython's `?` help syntax. A magic is one parse plus one `api` call; the panel is forms plus the same calls.
This layer imports only `api`, `config`, `errors`, `examples` and `display`."""
