"""The ``taskman`` command and the tools that drive whole phases."""
