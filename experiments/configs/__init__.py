"""Config files of the launchers (big_vision style): ``<task>.py`` has ``get_config(preset)``; see common.py."""
