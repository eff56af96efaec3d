"""What the tests share, and no test module: servers speaking the real protocols (the hub, S3, RunPod's job
queue), the worker as a process, tiny checkpoints, real speech, the bootstrap rig. Tests import from here,
never from one another; pytest's fixtures live in ``tests/conftest.py``."""
