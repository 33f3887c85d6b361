"""The competing engines `compare.py` measures next to qwen-deploy, and the models they run."""
