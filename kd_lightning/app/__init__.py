"""The Hydra shell: configs in ``conf/`` and the ``kd-train`` / ``kd-teachers`` commands."""
