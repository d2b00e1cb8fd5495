"""Sub-commands of the ``polynext`` command line (see ``polynext.cli.COMMANDS``)."""
