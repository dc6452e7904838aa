"""The ``kd-*`` commands and the Hydra glue that turns a config into modules, data and teachers."""
