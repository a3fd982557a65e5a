"""The commands. Each module's ``main(argv)`` reads a command line and returns its exit code;
``launch/NAME.py`` in a clone, ``alexnet-NAME`` once installed (underscores become hyphens) and
``python -m alexnet_mp.cli.NAME`` all run it. Under torchrun: ``torchrun ... launch/train.py``,
``torchrun ... -m alexnet_mp.cli.train`` or ``torchrun --no-python ... alexnet-train``."""
